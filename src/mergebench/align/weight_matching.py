"""Git Re-Basin weight matching: coordinate descent over groups, one linear assignment per group and step.

No data is needed. For group g the assignment maximises Σ_w ⟨W_A[w], W_B[w] permuted⟩ over every tensor given
that touches g, with the other groups held fixed. The aligner gives the models' *parameters* (weights, biases,
norm scale and shift: the paper's objective, DESIGN §5.1); BN running statistics are then permuted with their
group by `apply_transforms` but never scored — scored, a trained net's running variances outweigh its weights
(13,752 vs 859 on a trained ResNet20×1) and decide the matching.

Where the descent starts decides where it ends: from the identity, the first groups are solved against the
other groups' arbitrary order and the descent stalls in a worse local optimum (3–5% below PyPI `rebasin` on a
random 784-512³ MLP, whatever the restarts). So pass 1 is a sweep from the input side to the output side in
which each group is matched on the tensors whose other axes are already settled (its incoming weights: the
first layer's rows are exact), and the descent starts from that sweep when it beats the starting point — on
random MLPs it then ends 3–4% above `rebasin` (8% above the identity start), in 3 passes instead of 6–15.

Speed without changing the answer: a tensor's share of a group's n×n cost matrix (a GEMM in the weights' dtype,
on their device) is cached and brought up to date only when the group on its other axis has changed, by a GEMM
over the moved units alone when few moved (`_Member`); a group whose
neighbours have not changed since it was last solved is skipped (same cost, same assignment); an assignment is
accepted only if it raises the group's terms of the objective evaluated in float64, so the float64 objective
never decreases, whatever the GEMM's rounding.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mergebench.align.registry import ALIGNERS, Alignment
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.seeds import mix_seeds
from mergebench.spec import PermutationSpec, Transform


@dataclasses.dataclass
class WeightMatchingParams:
    seed: int = 0
    max_passes: int = 100
    restarts: int = 1
    start: str = "sweep"  # sweep | identity (Git Re-Basin's reference descent: identity, random group order)

    def check(self) -> None:
        if self.start not in ("sweep", "identity"):
            raise ConfigError(f"start={self.start!r} is not known; allowed: sweep, identity")
        if self.max_passes < 1:
            raise ConfigError(f"max_passes={self.max_passes} must be >= 1")
        if self.restarts < 1:
            raise ConfigError(f"restarts={self.restarts} must be >= 1")


class _Scratch:
    """Flat buffers reused from call to call: a fresh multi-megabyte tensor costs page faults that outweigh the
    arithmetic done on it (measured: the float64 objective of a ResNet20×4 spent most of its time allocating)."""

    CHUNK = 1 << 20  # float64 elements per dot-product chunk: bounds the float64 slots at 8 MB each

    def __init__(self, numel: int, device: torch.device) -> None:
        self.numel, self.device = numel, device
        self.buffers: dict[tuple[torch.dtype, int], Tensor] = {}

    def view(self, slot: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        buf = self.buffers.get((dtype, slot))
        if buf is None:
            size = self.numel if slot < 2 else min(self.numel, self.CHUNK)
            buf = self.buffers[dtype, slot] = torch.empty(size, dtype=dtype, device=self.device)
        return buf[: math.prod(shape)].view(shape)

    def permuted(self, t: Tensor, moves: list[tuple[int, Tensor]]) -> Tensor:
        """`t` with each (axis, perm) applied, in scratch slots 0 and 1 (valid until the next call)."""
        for i, (axis, perm) in enumerate(moves):
            out = self.view(i % 2, t.shape, t.dtype)
            torch.index_select(t, axis, perm, out=out)
            t = out
        return t

    def dot64(self, a: Tensor, b: Tensor) -> float:
        """⟨a, b⟩ in float64 (exact products for float32 inputs), in chunks through scratch slots 2 and 3."""
        a, b = a.reshape(-1), b.reshape(-1)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, a.numel(), self.CHUNK):
            part = torch.Size([min(self.CHUNK, a.numel() - start)])
            fa = self.view(2, part, torch.float64).copy_(a[start : start + part[0]])
            fb = self.view(3, part, torch.float64).copy_(b[start : start + part[0]])
            total += torch.dot(fa, fb)
        return float(total)


class _Member:
    """One tensor seen from one of its groups: that group's axis first, A flattened, B still to permute, and its
    cached share of the group's cost matrix with the versions of the other groups it was computed for.

    When the tensor's one other group has moved only some units since the share was computed, the share is
    updated by a GEMM over those units alone (A's columns for them times the change in B's) instead of redone:
    late passes move a few units of a group, and the full GEMM was most of their cost. Once the moved units add
    up to half the group's size the share is recomputed in full, which keeps its rounding error within a small
    multiple of one GEMM's (the bound `gain` uses)."""

    def __init__(self, a: Tensor, b: Tensor, axis: int, groups: tuple[str | None, ...]) -> None:
        order = [axis, *(i for i in range(a.dim()) if i != axis)]
        self.a = a.detach().permute(order).reshape(a.shape[axis], -1)
        self.b = b.detach().permute(order).contiguous()
        self.others = [(pos, groups[i]) for pos, i in enumerate(order) if pos > 0 and groups[i] is not None]
        # a bound on the share's rounding error for entry (i, j): c·eps·k·‖a_i‖·‖b_j‖ (row norms ignore
        # permutations); c = 4 covers one full GEMM plus incremental updates over at most k columns in all
        self.a_norm = torch.linalg.vector_norm(self.a, dim=1).double()
        self.b_norm = torch.linalg.vector_norm(self.b.reshape(self.b.shape[0], -1), dim=1).double()
        self.rounding = 4 * torch.finfo(a.dtype).eps * self.a.shape[1]
        self.key: tuple[int, ...] | None = None
        self.share: Tensor | None = None
        self.basis: Tensor | None = None  # the other group's permutation the share holds (one other group only)
        self.drift = 0  # units updated incrementally since the last full GEMM

    def b_rows(self, perms: Mapping[str, Tensor], scratch: _Scratch, units: Tensor | None = None) -> Tensor:
        """B's units (all, or those listed) as rows, every other axis permuted by its group's current permutation
        (in scratch)."""
        t = self.b if units is None else self.b.index_select(0, units)
        t = scratch.permuted(t, [(pos, perms[group]) for pos, group in self.others])
        return t.reshape(t.shape[0], -1)

    def cost_share(self, perms: Mapping[str, Tensor], versions: Mapping[str, int], scratch: _Scratch) -> Tensor:
        """A·π(B)ᵀ, brought up to date only when a group on one of the other axes has moved since the last call."""
        key = tuple(versions[g] for _, g in self.others)
        if key == self.key and self.share is not None:
            return self.share
        self.key = key
        if self.share is None:
            self.share = self.a.new_empty(self.a.shape[0], self.a.shape[0])
        if len(self.others) == 1 and self.basis is not None:
            pos, group = self.others[0]
            perm = perms[group]
            moved = torch.nonzero(perm != self.basis).flatten()
            if self.drift + moved.numel() <= perm.numel() // 2:
                self._update(pos, moved, self.basis[moved], perm[moved])
                self.drift += moved.numel()
                self.basis = perm
                return self.share
        torch.matmul(self.a, self.b_rows(perms, scratch).T, out=self.share)
        self.basis = perms[self.others[0][1]] if len(self.others) == 1 else None
        self.drift = 0
        return self.share

    def _update(self, pos: int, moved: Tensor, old: Tensor, new: Tensor) -> None:
        """share += A[:, moved]·(B[:, new] − B[:, old])ᵀ along axis `pos` (the other group's)."""
        if moved.numel() == 0:
            return
        n = self.a.shape[0]
        a = self.a.view(self.b.shape).index_select(pos, moved).reshape(n, -1)
        delta = (self.b.index_select(pos, new) - self.b.index_select(pos, old)).reshape(n, -1)
        self.share.addmm_(a, delta.T)


class _Problem:
    """Every (tensor, axis) that a group acts on, and the objective Σ_w ⟨W_A[w], π(W_B)[w]⟩ in float64."""

    def __init__(self, spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
        axes = {k: g for k, g in spec.axes.items() if k in state_a and any(g) and state_a[k].is_floating_point()}
        if not axes:
            raise ValueError("weight matching: no floating-point tensor of the state is mapped by the spec")
        self.axes = axes
        self.groups = [g for g in spec.groups if any(k in axes for k, _ in spec.members(g))]
        self.members = {
            g: [_Member(state_a[k], state_b[k], ax, axes[k]) for k, ax in spec.members(g) if k in axes]
            for g in self.groups
        }
        self.neighbours = {g: sorted({h for m in self.members[g] for _, h in m.others}) for g in self.groups}
        self.sizes = {g: self.members[g][0].a.shape[0] for g in self.groups}
        self.state_a, self.state_b = state_a, state_b
        self.device = state_a[next(iter(axes))].device
        self.scratch = _Scratch(max(state_a[k].numel() for k in axes), self.device)
        self._version = itertools.count()
        # the members no other group touches (biases, norm scale and shift, the first and last layers) add the
        # same matrix to every cost of their group: summed once
        self.constant: dict[str, Tensor | None] = {}
        for g in self.groups:
            fixed = [m.cost_share({}, {}, self.scratch).double() for m in self.members[g] if not m.others]
            self.constant[g] = torch.stack(fixed).sum(0) if fixed else None
            for m in self.members[g]:
                if not m.others:
                    m.share = None  # kept in the sum only
        self.variable = {g: [m for m in self.members[g] if m.others] for g in self.groups}

    def new_version(self) -> int:
        """A number never handed out before, so a cached cost share can never match a different permutation."""
        return next(self._version)

    def cost(self, group: str, perms: Mapping[str, Tensor], versions: Mapping[str, int], settled: bool) -> Tensor:
        """cost[i, j] = gain of matching B's unit j to A's unit i, the other groups held at `perms`, summed in
        float64. With `settled`, only the tensors whose other groups are all settled (versions ≥ 0) count, or all
        of them if none is."""
        members = self.variable[group]
        if settled:
            members = [m for m in members if all(versions[h] >= 0 for _, h in m.others)]
            if not members and self.constant[group] is None:
                members = self.variable[group]
        n = self.sizes[group]
        total = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        if self.constant[group] is not None:
            total += self.constant[group]
        for member in members:
            total += member.cost_share(perms, versions, self.scratch)
        return total

    def gain(self, group: str, cost: Tensor, perms: Mapping[str, Tensor], new: Tensor) -> float:
        """The objective's change when `group` goes from its current permutation to `new`: read off the cost
        matrix when it exceeds the GEMM's rounding bound, otherwise recomputed exactly in float64 (only the moved
        units count)."""
        old = perms[group]
        moved = torch.nonzero(old != new).flatten()
        if moved.numel() == 0:
            return 0.0
        approx = float(cost[moved, new[moved]].sum() - cost[moved, old[moved]].sum())
        bound = 0.0
        for m in self.members[group]:
            bound += m.rounding * float((m.a_norm[moved] * (m.b_norm[new[moved]] + m.b_norm[old[moved]])).sum())
        if abs(approx) > bound:
            return approx
        exact = 0.0
        for member in self.members[group]:
            b = member.b_rows(perms, self.scratch, torch.cat([new[moved], old[moved]])).double()
            a = member.a[moved].double()
            exact += float((a * (b[: moved.numel()] - b[moved.numel() :])).sum())
        return exact

    def objective(self, perms: Mapping[str, Tensor]) -> float:
        """Exact in float64: B permuted in its own dtype (exact), then one float64 dot product per tensor."""
        total = 0.0
        for name, groups in self.axes.items():
            moves = [(axis, perms[g]) for axis, g in enumerate(groups) if g is not None and g in perms]
            b = self.scratch.permuted(self.state_b[name].detach(), moves)
            total += self.scratch.dot64(self.state_a[name].detach(), b)
        return total


def _assign(cost: Tensor) -> Tensor:
    """The LAP's maximising assignment, `cols[i]` = B's unit for A's unit i."""
    _, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    return torch.from_numpy(cols).to(cost.device)


def _sweep(problem: _Problem, perms: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """One greedy pass from the input side to the output side: each group matched on the tensors whose other axes
    belong to groups already matched in this pass (or to none), the unmatched ones ignored rather than trusted
    at an arbitrary order. Returns the permutations and their versions (the cost shares cached for them)."""
    out = dict(perms)
    versions = dict.fromkeys(problem.groups, -1)
    for group in problem.groups:
        out[group] = _assign(problem.cost(group, out, versions, settled=True))
        versions[group] = problem.new_version()
    return out, versions


def _descend(
    problem: _Problem,
    perms: dict[str, Tensor],
    versions: dict[str, int],
    objective: float,
    gen: torch.Generator,
    max_passes: int,
) -> Iterator[float]:
    """Passes of one assignment per group, in a fresh seeded order each pass, updating `perms` in place and
    yielding the objective after each; an assignment is taken only when it raises the objective (by a margin
    beyond rounding, or checked exactly), so the objective never decreases. `versions` name `perms`' current
    permutations (fresh numbers for new ones) and are updated in place."""
    solved_at: dict[str, tuple[int, ...]] = {}  # the neighbours' versions when a group was last solved
    for _ in range(max_passes):
        before = objective
        for i in torch.randperm(len(problem.groups), generator=gen).tolist():
            group = problem.groups[i]
            state = tuple(versions[h] for h in problem.neighbours[group])
            if solved_at.get(group) == state:
                continue
            solved_at[group] = state
            cost = problem.cost(group, perms, versions, settled=False)
            candidate = _assign(cost)
            gain = problem.gain(group, cost, perms, candidate)
            if gain > 0:
                perms[group] = candidate
                versions[group] = problem.new_version()
                objective += gain
        yield objective
        if objective - before < 1e-12 * abs(before):
            return


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    seed: int,
    max_passes: int = 100,
    restarts: int = 1,
    init: Mapping[str, Tensor] | None = None,
    sweep: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Permutations (`perm[i]` = B's unit matched to A's unit i, on CPU) carrying B onto A, and diagnostics.

    Scores exactly the tensors of `state_a`/`state_b` that the spec maps (pass parameters only to leave running
    statistics out, as the aligner does). Restart 0 starts from `init` (a warm start, e.g. STE's previous step),
    else from the identity with pass 1 the input-to-output sweep (kept when it beats the identity; `sweep=False`
    leaves it out: Git Re-Basin's reference descent, kept to reproduce numbers made with it); later
    restarts start from random permutations. Every descent pass visits the groups in a fresh order drawn from a
    generator seeded with `seed`, and a run stops after a pass that improves the objective by less than a
    relative 1e-12 or after `max_passes` passes. The best restart wins; `history` is its objective before the
    first pass and after every pass.
    """
    start = time.perf_counter()
    (plain, state_a), (_, state_b) = spec.plain_view(state_a), spec.plain_view(state_b)  # flatten/cat parts
    problem = _Problem(plain, state_a, state_b)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[dict[str, Tensor], list[float], int] | None = None
    for restart in range(restarts):
        if restart == 0 and init is not None:
            perms = {g: init[g].to(problem.device) for g in problem.groups}
        elif restart == 0:
            perms = {g: torch.arange(n, device=problem.device) for g, n in problem.sizes.items()}
        else:
            perms = {g: torch.randperm(n, generator=gen).to(problem.device) for g, n in problem.sizes.items()}
        versions = {g: problem.new_version() for g in problem.groups}
        history = [problem.objective(perms)]
        if restart == 0 and init is None and sweep:
            swept, swept_versions = _sweep(problem, perms)
            history.append(max(history[0], problem.objective(swept)))
            if history[1] > history[0]:
                perms, versions = swept, swept_versions
        history.extend(_descend(problem, perms, versions, history[-1], gen, max_passes - len(history) + 1))
        if best is None or history[-1] > best[1][-1]:
            best = perms, history, restart
    assert best is not None
    perms, history, restart = best
    info = {
        "objective": problem.objective(perms),
        "passes": len(history) - 1,
        "restart": restart,
        "history": history,
        "seconds": time.perf_counter() - start,
    }
    return {g: p.cpu() for g, p in perms.items()}, info


def rematch_by_weights(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    perms: Mapping[str, Tensor],
    units: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """`perms` with, per group, A's `units` rematched among the B units they hold by weight matching's cost (the
    other groups at `perms`): for units another method could not place (dead on the merge data)."""
    (plain, state_a), (_, state_b) = spec.plain_view(state_a), spec.plain_view(state_b)
    problem = _Problem(plain, state_a, state_b)
    current = {g: perms[g].to(problem.device) for g in problem.groups}
    versions = {g: problem.new_version() for g in problem.groups}
    out = dict(current)
    for group, rows in units.items():
        if group not in problem.sizes or rows.numel() < 2:
            continue
        rows = rows.to(problem.device)
        held = current[group][rows]
        cost = problem.cost(group, current, versions, settled=False)[rows][:, held]
        out[group] = current[group].clone()
        out[group][rows] = held[_assign(cost)]
    return {g: p.cpu() for g, p in out.items()}


def parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters by state-dict name, detached: what weight matching scores (DESIGN §5.1)."""
    return {k: v.detach() for k, v in model.named_parameters()}


@ALIGNERS.register("weight_matching", WeightMatchingParams, label="Weight Matching", abbrev="WM")
def align_weight_matching(
    params: WeightMatchingParams, ref: nn.Module, other: nn.Module, ctx: MergeContext
) -> Alignment:
    perms, info = weight_matching(
        ctx.spec,
        parameters(ref),
        parameters(other),
        seed=mix_seeds(ctx.seed, params.seed),
        max_passes=params.max_passes,
        restarts=params.restarts,
        sweep=params.start == "sweep",
    )
    return Alignment({g: Transform.permutation(p) for g, p in perms.items()}, info)
