"""Permutation specs, per-group transforms, and the one function that applies them to a state dict.

A spec says, for every parameter and buffer, which permutation group acts on each axis (axis 0 is the
output axis, the others are inputs), and which modules' outputs carry each group's units (probes, used by
activation-based aligners and REPAIR). Every aligner returns one `Transform` per group it changes.

An axis can also be made of parts (`PermutationSpec.parts`): a Linear reading a flattened C×H×W map sees
C blocks of H·W entries (one part, block H·W), a conv reading `cat([x, y], dim=1)` sees x's units then y's (two
parts, two groups), a Linear whose output is cut by `chunk` into q, k, v has one part per piece on its output axis,
and a grouped conv's input axis is G parts that all name one group (one permutation applied inside every block).
A group can also be made of attention heads (`PermutationSpec.heads`): its units are H heads of d units in a row,
and it may move only by a permutation of whole heads that every group of its tie shares (q/k, v, a head-indexed
bias), each head's units then moved within the head by the group's own permutation (`spec/heads.py`).
Methods that score tensors read them through `plain_view`, which splits such axes into plain ones;
`apply_transforms` moves every part with its group.

A core type: models state their spec, aligners, strategies and REPAIR read it, so it imports nothing of mergebench.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Collection, Mapping

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Part:
    """`units` consecutive units of `group` (None: unpermuted) on an axis, from entry `offset` on, each unit
    spread over `block` contiguous entries; with a `stride`, unit i starts at entry offset + i·stride instead of
    offset + i·block (a channel shuffle interleaves the units of several groups)."""

    group: str | None
    offset: int
    units: int
    block: int = 1
    stride: int = 0  # 0: the units are contiguous (stride = block)

    @property
    def size(self) -> int:
        return self.units * self.block

    @property
    def contiguous(self) -> bool:
        """Whether the part's entries are one run (no interleaving stride)."""
        return not self.stride or self.stride == self.block

    def entries(self) -> Tensor:
        """The axis entries of the part, unit by unit (each unit's `block` entries in a row)."""
        step = self.stride or self.block
        return (self.offset + torch.arange(self.units)[:, None] * step + torch.arange(self.block)).flatten()


@dataclasses.dataclass(frozen=True)
class ProbeView:
    """Where a probe's output holds its group's units when not on dim 1 (channels-last maps, tokens [N, T, D]),
    and the axes to average out first: those holding another permuted group (a token-mixing MLP's [N, D, hidden]
    output), whose positions differ between models and so cannot pair A's samples with B's."""

    axis: int = 1
    pooled: tuple[int, ...] = ()
    # units [start, stop) of that axis, where the group is a segment of it (a grouped conv's block, a chunk); such a
    # probe is named `module[start:stop]`, so one module can probe each of its segments
    segment: tuple[int, int] | None = None


def probe_module(probe: str) -> str:
    """The module a probe reads: the probe's name, but for a segment probe `module[start:stop]`."""
    return probe.partition("[")[0]


@dataclasses.dataclass(frozen=True)
class Heads:
    """A group whose units are `count` attention heads of equal size, head by head: in attention, the scores of
    head h depend on q and k of head h only, so heads may change places, but q, k, v and the output projection's
    input must move their heads alike — every group with the same `tie` shares one head permutation σ, and where
    `tie` is itself a group (a relative-position bias indexed by head) that group's permutation is σ. Within each
    head, the group's units move by a permutation of their own (q·k is invariant to one shared by q and k)."""

    tie: str
    count: int


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    axes: dict[str, tuple[str | None, ...]]
    probes: dict[str, tuple[str, ...]]
    # tensor name -> {axis: its parts}; such an axis is None in `axes`
    parts: dict[str, dict[int, tuple[Part, ...]]] = dataclasses.field(default_factory=dict)
    # probe -> how its module's output holds the units, where not simply on dim 1
    probe_views: dict[str, ProbeView] = dataclasses.field(default_factory=dict)
    # group -> its attention heads, where its permutations must move whole heads
    heads: dict[str, Heads] = dataclasses.field(default_factory=dict)
    # groups carried by a residual stream (summed with a block's output), for aligners that can leave them in place
    residual: tuple[str, ...] = ()

    @property
    def groups(self) -> list[str]:
        """Groups in the order they first appear in the state dict (input side to output side)."""
        seen: dict[str, None] = {}
        for name, groups in self.axes.items():
            for axis, g in enumerate(groups):
                for h in [g] if g is not None else [p.group for p in self.parts.get(name, {}).get(axis, ())]:
                    if h is not None:
                        seen.setdefault(h, None)
        return list(seen)

    def members(self, group: str) -> list[tuple[str, int]]:
        """Every plain (tensor name, axis) that the group acts on; axes made of parts are in `part_members`."""
        return [(k, ax) for k, groups in self.axes.items() for ax, g in enumerate(groups) if g == group]

    def part_members(self, group: str) -> list[tuple[str, int, Part]]:
        return [(k, ax, p) for k, axes in self.parts.items() for ax, ps in axes.items() for p in ps if p.group == group]

    def group_size(self, group: str, state: Mapping[str, Tensor]) -> int:
        members = self.members(group)
        if members:
            name, axis = members[0]
            return state[name].shape[axis]
        return self.part_members(group)[0][2].units

    def plain_view(self, state: Mapping[str, Tensor]) -> tuple[PermutationSpec, dict[str, Tensor]]:
        """The spec and state with every axis made of parts split into plain tensors (`name#k` for part k, its
        axis reshaped into units × block; one `#k` per axis with parts, the last axis's first), so a method that scores
        Σ⟨A, π(B)⟩ tensor by tensor sees every entry once on axes that each one group acts on. Parts of one axis
        that name the same group become several tensors of that group. Tensors without parts are passed as they
        are."""
        if not self.parts:
            return self, dict(state)
        axes = {k: v for k, v in self.axes.items() if k not in self.parts}
        out = {k: v for k, v in state.items() if k not in self.parts}
        for name, by_axis in self.parts.items():
            if name not in state:
                continue
            pieces = {name: (state[name], self.axes[name])}
            for axis in sorted(by_axis, reverse=True):  # from the last axis: a split never shifts one still to come
                pieces = {
                    f"{key}#{k}": (
                        _take(tensor, axis, part).unflatten(axis, (part.units, part.block)),
                        (*groups[:axis], part.group, None, *groups[axis + 1 :]),
                    )
                    for key, (tensor, groups) in pieces.items()
                    for k, part in enumerate(by_axis[axis])
                }
            for key, (tensor, groups) in pieces.items():
                out[key] = tensor.contiguous()
                axes[key] = groups
        plain = PermutationSpec(
            axes=axes, probes=self.probes, probe_views=self.probe_views, heads=self.heads, residual=self.residual
        )
        return plain, out

    def ties(self) -> dict[str, list[str]]:
        """Each head tie and the groups whose heads it moves (the tie's own group, if any, not among them)."""
        out: dict[str, list[str]] = {}
        for group, heads in self.heads.items():
            out.setdefault(heads.tie, []).append(group)
        return out

    def tie_of(self, group: str) -> str | None:
        """The head tie `group` moves with: its own where it is made of heads, itself where it is a tie's group."""
        if group in self.heads:
            return self.heads[group].tie
        return group if any(h.tie == group for h in self.heads.values()) else None

    def without(self, groups: Collection[str]) -> PermutationSpec:
        """The spec with `groups` left unpermuted (their axes and parts unmapped, their probes dropped): what an
        aligner sees when it must leave them in place. A group's head tie goes with it, whole."""
        drop = set(groups)
        for tie, members in self.ties().items():
            if drop & {tie, *members}:
                drop |= {tie, *members}
        axes = {k: tuple(None if g in drop else g for g in v) for k, v in self.axes.items()}

        def unmapped(ps: tuple[Part, ...]) -> tuple[Part, ...]:
            return tuple(dataclasses.replace(p, group=None) if p.group in drop else p for p in ps)

        parts = {k: {ax: unmapped(ps) for ax, ps in v.items()} for k, v in self.parts.items()}
        return PermutationSpec(
            axes=axes,
            probes={g: p for g, p in self.probes.items() if g not in drop},
            parts=parts,
            probe_views=self.probe_views,
            heads={g: h for g, h in self.heads.items() if g not in drop},
            residual=tuple(g for g in self.residual if g not in drop),
        )

    def head_groups(self) -> list[str]:
        """Every group that moves with attention heads: the groups made of heads and the ties that are groups."""
        ties = self.ties()
        return [g for g in self.groups if g in self.heads or g in ties]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A change of basis for one group: a permutation (`perm[i]` = source unit for unit i) or a dense map.

    For dense maps, `matrix` carries B's units into the reference basis (h' = T h) and `inverse` is T⁻¹. A
    non-square `matrix` (n_ref × n_B: OT fusion of models of different widths) changes the group's width and needs
    an explicit n_B × n_ref `inverse`.
    """

    perm: Tensor | None = None
    matrix: Tensor | None = None
    inverse: Tensor | None = None

    @staticmethod
    def permutation(perm: Tensor) -> Transform:
        return Transform(perm=perm.long())

    @staticmethod
    def dense(matrix: Tensor, inverse: Tensor | None = None) -> Transform:
        inv = torch.linalg.inv(matrix.double()).to(matrix.dtype) if inverse is None else inverse
        return Transform(matrix=matrix, inverse=inv)

    @property
    def is_permutation(self) -> bool:
        return self.perm is not None


def _apply_axis(t: Tensor, axis: int, tf: Transform, is_variance: bool) -> Tensor:
    if tf.perm is not None:
        return t.index_select(axis, tf.perm.to(t.device))
    mat = (tf.matrix if axis == 0 else tf.inverse.T).to(t.device, torch.float64)
    moved = t.double().movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    out = mat.pow(2) @ flat if is_variance else mat @ flat
    return out.reshape(mat.shape[0], *moved.shape[1:]).movedim(0, axis).to(t.dtype)


def apply_transforms(
    state: Mapping[str, Tensor], spec: PermutationSpec, transforms: Mapping[str, Transform]
) -> dict[str, Tensor]:
    """Return a new state dict with every group's transform applied: T on the axes where the group is the
    output (axis 0), T⁻¹ on the axes where it is an input. The empty mapping is the identity.

    Permutations are exact for every tensor, BatchNorm running statistics included. A dense map T is exact
    only where the network is linear in the group's units; normalisation layers are not: their per-unit vectors
    (scale, shift, running mean) are carried as T·v, and a running variance becomes diag(T diag(v) Tᵀ) = (T∘T)·v,
    the variance of T·h if the units were uncorrelated — non-negative, but not the true variance, which needs
    the full covariance. Dense maps (CCA) are therefore meant for BN-free nets or to be followed by reset_bn.
    """
    out: dict[str, Tensor] = OrderedDict()
    if getattr(state, "_metadata", None) is not None:  # modules that read their version on load keep it
        out._metadata = state._metadata
    for name, tensor in state.items():
        t = tensor
        variance = name.endswith("running_var")
        for axis, group in enumerate(spec.axes.get(name, ())):
            if group is not None and group in transforms:
                t = _apply_axis(t, axis, transforms[group], variance)
        for axis, parts in spec.parts.get(name, {}).items():
            if any(p.group in transforms for p in parts):
                t = _apply_parts(t, axis, parts, transforms, variance)
        out[name] = t.clone() if t is tensor else t
    return out


def _take(t: Tensor, axis: int, part: Part) -> Tensor:
    """The part's entries of axis `axis`, unit by unit."""
    if part.contiguous:
        return t.narrow(axis, part.offset, part.size)
    return t.index_select(axis, part.entries().to(t.device))


def _apply_parts(
    t: Tensor, axis: int, parts: tuple[Part, ...], transforms: Mapping[str, Transform], variance: bool
) -> Tensor:
    """An axis made of parts: each part's units moved by its group's transform, blocks kept together. Contiguous
    parts are moved and concatenated in order (a transform may change a group's width: OT fusion); interleaved ones
    (a `stride`) are moved in place."""
    if all(p.contiguous for p in parts):
        pieces = []
        for part in parts:
            piece = t.narrow(axis, part.offset, part.size)
            if part.group in transforms:
                units = piece.unflatten(axis, (part.units, part.block))
                piece = _apply_axis(units, axis, transforms[part.group], variance).flatten(axis, axis + 1)
            pieces.append(piece)
        return torch.cat(pieces, dim=axis)
    out = t.clone()
    for part in parts:
        if part.group in transforms:
            units = _take(t, axis, part).unflatten(axis, (part.units, part.block))
            moved = _apply_axis(units, axis, transforms[part.group], variance).flatten(axis, axis + 1)
            out.index_copy_(axis, part.entries().to(t.device), moved.to(out.dtype))
    return out


def random_permutations(spec: PermutationSpec, state: Mapping[str, Tensor], seed: int) -> dict[str, Transform]:
    """A random permutation for every group (seeded; whole heads moved alike across a tie), for tests and
    planted-permutation checks."""
    from mergebench.spec.heads import draw_permutations

    gen = torch.Generator().manual_seed(seed)
    sizes = {g: spec.group_size(g, state) for g in spec.groups}
    perms = draw_permutations(spec, sizes, lambda n: torch.randperm(n, generator=gen))
    return {g: Transform.permutation(p) for g, p in perms.items()}
