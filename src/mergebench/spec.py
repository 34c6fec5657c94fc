"""Permutation specs, per-group transforms, and the one function that applies them to a state dict.

A spec says, for every parameter and buffer, which permutation group acts on each axis (axis 0 is the
output axis, the others are inputs), and which modules' outputs carry each group's units (probes, used by
activation-based aligners and REPAIR). Every aligner returns one `Transform` per group it changes.

A core type: models state their spec, aligners, strategies and REPAIR read it, so it imports nothing of mergebench.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    axes: dict[str, tuple[str | None, ...]]
    probes: dict[str, tuple[str, ...]]

    @property
    def groups(self) -> list[str]:
        """Groups in the order they first appear in the state dict (input side to output side)."""
        seen: dict[str, None] = {}
        for groups in self.axes.values():
            for g in groups:
                if g is not None:
                    seen.setdefault(g, None)
        return list(seen)

    def members(self, group: str) -> list[tuple[str, int]]:
        """Every (tensor name, axis) that the group acts on."""
        return [(k, ax) for k, groups in self.axes.items() for ax, g in enumerate(groups) if g == group]

    def group_size(self, group: str, state: Mapping[str, Tensor]) -> int:
        name, axis = self.members(group)[0]
        return state[name].shape[axis]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A change of basis for one group: a permutation (`perm[i]` = source unit for unit i) or a dense map.

    For dense maps, `matrix` carries B's units into the reference basis (h' = T h) and `inverse` is T⁻¹.
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
    return out.reshape(moved.shape).movedim(0, axis).to(t.dtype)


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
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        t = tensor
        for axis, group in enumerate(spec.axes.get(name, ())):
            if group is not None and group in transforms:
                t = _apply_axis(t, axis, transforms[group], name.endswith("running_var"))
        out[name] = t.clone() if t is tensor else t
    return out


def random_permutations(spec: PermutationSpec, state: Mapping[str, Tensor], seed: int) -> dict[str, Transform]:
    """A random permutation for every group (seeded), for tests and planted-permutation checks."""
    gen = torch.Generator().manual_seed(seed)
    return {g: Transform.permutation(torch.randperm(spec.group_size(g, state), generator=gen)) for g in spec.groups}
