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

Speed without changing the answer (random torchvision-layout ResNet-50 pairs, one CPU thread: 1.3–1.8× faster
than per-tensor caches summed at every step, e.g. 7.8 s → 4.8 s, the same permutations in every step;
scripts/bench_wm_resnet50.py): each group keeps one float64 n×n cost matrix (each GEMM in the weights' dtype,
float32 or wider, on their device, then added in float64) and brings it up to date only for the groups on its
tensors' other axes that changed since, by one GEMM over the moved units' columns of all its tensors at once
(`_Problem.cost`); the tensors no other group touches are summed once. Its rounding error is tracked as a bound,
and the matrix is rebuilt before the bound grows past 8 builds' worth. A group whose neighbours have not changed
since it was last solved is skipped (same cost, same assignment). The LAP goes to PyPI `lap`'s Jonker-Volgenant
solver where it is installed (from n = 128; else scipy). An assignment is accepted only if it raises the group's
terms of the objective — read off the matrix when the change exceeds the rounding bound, else evaluated in
float64 — so the float64 objective never decreases, whatever the GEMMs' rounding.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mergebench.align.assignment import assign, assign_heads
from mergebench.align.options import AttentionOptions
from mergebench.align.registry import ALIGNERS, PairAlignment, pairwise_aligner
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.seeds import mix_seeds
from mergebench.spec import PermutationSpec, Transform
from mergebench.spec.heads import draw_permutations


@dataclasses.dataclass
class WeightMatchingParams(AttentionOptions):
    seed: int = 0
    max_passes: int = 100
    restarts: int = 1
    start: str = "sweep"  # sweep | identity (Git Re-Basin's reference descent: identity, random group order)

    def check(self) -> None:
        super().check()
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


def _row_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).double()


class _Member:
    """One tensor seen from one of its groups: that group's axis first, A flattened to rows, B kept with its axes
    (read with the other groups' axes permuted), both in the group's cost dtype."""

    def __init__(self, a: Tensor, b: Tensor, axis: int, groups: tuple[str | None, ...], dtype: torch.dtype) -> None:
        order = [axis, *(i for i in range(a.dim()) if i != axis)]
        self.b = b.detach().to(dtype).permute(order).contiguous()
        self.a = a.detach().to(dtype).permute(order).reshape(a.shape[axis], -1)
        self.others = [(pos, groups[i]) for pos, i in enumerate(order) if pos > 0 and groups[i] is not None]
        self.cols = self.a.shape[1]

    def b_rows(self, perms: Mapping[str, Tensor], scratch: _Scratch, units: Tensor | None = None) -> Tensor:
        """B's units (all, or those listed) as rows, every other axis permuted by its group's current permutation
        (in scratch)."""
        t = self.b if units is None else self.b.index_select(0, units)
        t = scratch.permuted(t, [(pos, perms[group]) for pos, group in self.others])
        return t.reshape(t.shape[0], -1)

    def change(
        self, pos: int, moved: Tensor, old: Tensor, new: Tensor, held: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The columns of A and of the change in π(B) when the group on axis `pos` takes `new[k]` instead of
        `old[k]` at positions `moved[k]` (the other axes at `held`): the cost changes by a·dᵀ."""
        n = self.a.shape[0]
        a = self.a.view(self.b.shape).index_select(pos, moved).reshape(n, -1)
        rest = [(p, held[g]) for p, g in self.others if p != pos]
        b_new = self.b.index_select(pos, new)
        b_old = self.b.index_select(pos, old)
        for p, perm in rest:  # rare: a tensor with two or more other groups
            b_new, b_old = b_new.index_select(p, perm), b_old.index_select(p, perm)
        return a, (b_new - b_old).reshape(n, -1)


class _Cost:
    """A group's cost matrix Σ_m A_m·π(B_m)ᵀ over the members it holds, with the other groups' permutations it was
    computed for (`held[m]`, and their versions `keys[m]`) and `rho`: its rounding error is at most
    rho·u·‖A_i‖·‖B_j‖ for entry (i, j) (u the GEMMs' unit roundoff, norms over all the group's tensors)."""

    def __init__(self) -> None:
        self.matrix: Tensor | None = None
        self.held: dict[int, dict[str, Tensor]] = {}
        self.keys: dict[int, tuple[int, ...]] = {}
        self.rho = 0.0


class _Problem:
    """Every (tensor, axis) that a group acts on, each group's cost matrix kept up to date, and the objective
    Σ_w ⟨W_A[w], π(W_B)[w]⟩ in float64.

    A group's cost matrix is one float64 n×n matrix, each GEMM done in the weights' dtype (float32 or wider) and
    added in float64 — in float32, the ones of a fresh norm scale (1 per entry and norm) round every other term
    at their magnitude, and the descent of a random ResNet-50 pair took another path. The members no other group
    touches (biases, norm scale and shift, the first and last layers) are summed once; the others are added by
    one GEMM each on a full build. After that the matrix is brought up to date only for the other
    groups that changed since, by one GEMM over the columns of the moved units (A's columns for them times the
    change in B's, for all members at once) — late passes move a few units of a group. A full build is redone
    once the incremental columns would cost more than half a build, or once the rounding bound `rho` would pass
    REBUILD_RHO builds' worth; `gain` uses the bound."""

    # 8 builds' worth: what the per-tensor caches this replaced allowed (4·eps·K); 3 rebuilt 11 more matrices in a
    # ResNet-50 run (38 builds → 48, the 2048-unit group among them), for no change in any step
    REBUILD_RHO = 8.0

    def __init__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        solver: str | None = None,
    ) -> None:
        if solver not in (None, "lap", "scipy"):
            raise ValueError(f"solver={solver!r} is not known; allowed: None (automatic), lap, scipy")
        self.solver = solver
        axes = {k: g for k, g in spec.axes.items() if k in state_a and any(g) and state_a[k].is_floating_point()}
        if not axes:
            raise ValueError("weight matching: no floating-point tensor of the state is mapped by the spec")
        self.axes = axes
        self.groups = [g for g in spec.groups if any(k in axes for k, _ in spec.members(g))]
        self.state_a, self.state_b = state_a, state_b
        self.device = state_a[next(iter(axes))].device
        self.scratch = _Scratch(max(state_a[k].numel() for k in axes), self.device)
        self._version = itertools.count()
        self.seconds: dict[str, float] = dict.fromkeys(("cost", "lap", "gain", "objective"), 0.0)
        self.counts: dict[str, int] = dict.fromkeys(("solves", "builds", "updates", "exact_gains"), 0)
        self.members: dict[str, list[_Member]] = {}
        self.variable: dict[str, list[_Member]] = {}
        self.constant: dict[str, Tensor | None] = {}
        self.const_rho: dict[str, float] = {}
        self.unit: dict[str, float] = {}
        self.a_norm: dict[str, Tensor] = {}
        self.b_norm: dict[str, Tensor] = {}
        self.costs: dict[str, _Cost] = {}
        self.products: dict[torch.dtype, Tensor] = {}
        for g in self.groups:
            keys = [(k, ax) for k, ax in spec.members(g) if k in axes]
            dtype = torch.float32
            for k, _ in keys:
                dtype = torch.promote_types(dtype, state_a[k].dtype)
            members = [_Member(state_a[k], state_b[k], ax, axes[k], dtype) for k, ax in keys]
            self.members[g] = members
            self.variable[g] = [m for m in members if m.others]
            self.unit[g] = torch.finfo(dtype).eps / 2
            # the members no other group touches add the same matrix to every cost of their group, summed once in
            # float64: the vectors (biases, norm scale and shift: one column each) by one float64 GEMM, each other
            # tensor (first and last layers) by a GEMM of its own — in one float32 GEMM, a norm scale of ones
            # (a constant 1 per entry) would round every other term at its magnitude
            fixed = [m for m in members if not m.others]
            self.constant[g], self.const_rho[g] = None, 0.0
            if fixed:
                vectors = [m for m in fixed if m.cols == 1]
                total = torch.zeros(len(fixed[0].a), len(fixed[0].a), dtype=torch.float64, device=self.device)
                if vectors:
                    a = torch.cat([m.a for m in vectors], dim=1).double()
                    total += a @ torch.cat([m.b.reshape(-1, 1) for m in vectors], dim=1).double().T
                for m in fixed:
                    if m.cols > 1:
                        total += m.a @ m.b.reshape(m.b.shape[0], -1).T
                self.constant[g] = total
                self.const_rho[g] = max(m.cols for m in fixed) + len(fixed) + 1.0
            # row norms over all the group's tensors, for the rounding bound (permutations leave them unchanged)
            self.a_norm[g] = torch.stack([_row_norm(m.a) for m in members]).square().sum(0).sqrt()
            self.b_norm[g] = torch.stack([_row_norm(m.b) for m in members]).square().sum(0).sqrt()
            self.costs[g] = _Cost()
        self.neighbours = {g: sorted({h for m in self.members[g] for _, h in m.others}) for g in self.groups}
        self.sizes = {g: self.members[g][0].a.shape[0] for g in self.groups}
        self.spec = spec
        self.heads = {g: h for g, h in spec.heads.items() if g in self.sizes}
        self.units = _units(spec, self.groups)

    def random_start(self, gen: torch.Generator) -> dict[str, Tensor]:
        """A random permutation per group, whole heads moved alike across a tie (a restart's starting point)."""
        perms = draw_permutations(self.spec, self.sizes, lambda n: torch.randperm(n, generator=gen))
        return {g: p.to(self.device) for g, p in perms.items()}

    def solve(
        self, unit: tuple[str, ...], perms: Mapping[str, Tensor], versions: Mapping[str, int], settled: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The best permutations of `unit` (one group, or a tie of head groups solved at once) with the other
        groups held at `perms`, and the cost matrices they came from."""
        costs = {g: self.cost(g, perms, versions, settled) for g in unit}
        members = [g for g in unit if g in self.heads]
        if not members:
            return {g: self.assign(costs[g]) for g in unit}, costs
        start = time.perf_counter()
        tie = self.heads[members[0]].tie
        found, sigma = assign_heads([costs[g] for g in members], self.heads[members[0]].count, costs.get(tie))
        self.seconds["lap"] += time.perf_counter() - start
        self.counts["solves"] += 1
        return {**dict(zip(members, found, strict=True)), **({tie: sigma} if tie in unit else {})}, costs

    def new_version(self) -> int:
        """A number never handed out before, so a cached cost can never match a different permutation."""
        return next(self._version)

    def _full_rho(self, group: str, members: list[int]) -> float:
        """The rounding bound of a full build over `members` (error ≤ Σ_m K_m·u·S_m ≤ max K·u·S, one more u per
        addition)."""
        cols = [self.variable[group][i].cols for i in members]
        return max([self.const_rho[group], *cols]) + len(members) + 1.0

    def cost(self, group: str, perms: Mapping[str, Tensor], versions: Mapping[str, int], settled: bool) -> Tensor:
        """cost[i, j] = gain of matching B's unit j to A's unit i, the other groups held at `perms` (the cached
        matrix: valid until the next call for this group). With `settled`, only the tensors whose other groups are
        all settled (versions ≥ 0) count, or all of them if none is."""
        start = time.perf_counter()
        variable = self.variable[group]
        target = list(range(len(variable)))
        if settled:
            target = [i for i in target if all(versions[h] >= 0 for _, h in variable[i].others)]
            if not target and self.constant[group] is None:
                target = list(range(len(variable)))
        cache = self.costs[group]
        limit = self.REBUILD_RHO * self._full_rho(group, list(range(len(variable))))
        build = cache.matrix is None or any(i not in target for i in cache.held)
        steps: list[tuple[int, int, str, Tensor]] = []  # (member, axis, group, moved units) to bring up to date
        stale: list[int] = []  # members held at other versions than the current ones
        missing = [i for i in target if i not in cache.held]
        if not build:
            inc_cols = 0
            for i in target:
                if i in missing or cache.keys[i] == tuple(versions[h] for _, h in variable[i].others):
                    continue
                stale.append(i)
                member = variable[i]
                for pos, h in member.others:
                    moved = torch.nonzero(perms[h] != cache.held[i][h]).flatten()
                    if moved.numel():
                        steps.append((i, pos, h, moved))
                        inc_cols += moved.numel() * member.cols // member.b.shape[pos]
            add_rho = 2.0 * inc_cols + 3.0 + sum(variable[i].cols + 1.0 for i in missing)
            var_cols = sum(variable[i].cols for i in target)
            build = inc_cols > var_cols / 2 or cache.rho + add_rho > limit
        if build:
            self._build(group, target, perms, versions)
        else:
            self._update(group, steps, stale, missing, perms, versions)
        self.seconds["cost"] += time.perf_counter() - start
        assert cache.matrix is not None
        return cache.matrix

    def _build(self, group: str, target: list[int], perms: Mapping[str, Tensor], versions: Mapping[str, int]) -> None:
        cache, n = self.costs[group], self.sizes[group]
        if cache.matrix is None:
            cache.matrix = torch.empty(n, n, dtype=torch.float64, device=self.device)
        if self.constant[group] is not None:
            cache.matrix.copy_(self.constant[group])
        else:
            cache.matrix.zero_()
        cache.held, cache.keys = {}, {}
        for i in target:
            self._add(group, i, perms, versions)
        cache.rho = self._full_rho(group, target)
        self.counts["builds"] += 1

    def _product(self, a: Tensor, b: Tensor) -> Tensor:
        """a·bᵀ in their dtype, in a reused n×n buffer (valid until the next call)."""
        n = a.shape[0]
        buf = self.products.get(a.dtype)
        if buf is None or buf.numel() < n * n:
            buf = self.products[a.dtype] = torch.empty(n * n, dtype=a.dtype, device=self.device)
        return torch.matmul(a, b.T, out=buf[: n * n].view(n, n))

    def _add(self, group: str, i: int, perms: Mapping[str, Tensor], versions: Mapping[str, int]) -> None:
        cache, member = self.costs[group], self.variable[group][i]
        cache.matrix += self._product(member.a, member.b_rows(perms, self.scratch))  # type: ignore[operator]
        cache.held[i] = {h: perms[h] for _, h in member.others}
        cache.keys[i] = tuple(versions[h] for _, h in member.others)

    def _update(
        self,
        group: str,
        steps: list[tuple[int, int, str, Tensor]],
        stale: list[int],
        missing: list[int],
        perms: Mapping[str, Tensor],
        versions: Mapping[str, int],
    ) -> None:
        cache, variable = self.costs[group], self.variable[group]
        parts_a, parts_d = [], []
        for i, pos, h, moved in steps:
            held = cache.held[i]
            a, d = variable[i].change(pos, moved, held[h][moved], perms[h][moved], held)
            parts_a.append(a)
            parts_d.append(d)
            cache.held[i] = {**held, h: perms[h]}
        if parts_a:
            a, d = torch.cat(parts_a, dim=1), torch.cat(parts_d, dim=1)
            cache.matrix += self._product(a, d)  # type: ignore[operator]
            cache.rho += 2.0 * a.shape[1] + 3.0
            self.counts["updates"] += 1
        for i in stale:
            cache.keys[i] = tuple(versions[h] for _, h in variable[i].others)
        for i in missing:
            self._add(group, i, perms, versions)
            cache.rho += variable[i].cols + 1.0

    def gain(self, group: str, cost: Tensor, perms: Mapping[str, Tensor], new: Tensor) -> float:
        """The objective's change when `group` goes from its current permutation to `new`: read off the cost
        matrix when it exceeds the matrix's rounding bound, otherwise recomputed exactly in float64 (only the
        moved units count)."""
        start = time.perf_counter()
        try:
            old = perms[group]
            moved = torch.nonzero(old != new).flatten()
            if moved.numel() == 0:
                return 0.0
            new_m, old_m = new[moved], old[moved]
            approx = float(cost[moved, new_m].double().sum() - cost[moved, old_m].double().sum())
            norms = self.a_norm[group][moved] * (self.b_norm[group][new_m] + self.b_norm[group][old_m])
            bound = 2.0 * self.costs[group].rho * self.unit[group] * float(norms.sum())
            if abs(approx) > bound:
                return approx
            self.counts["exact_gains"] += 1
            # the moved units take B's units among themselves: old_m is new_m reordered, so B's rows are read once
            where = torch.empty(len(new), dtype=torch.long, device=new.device)
            where[new_m] = torch.arange(moved.numel(), device=new.device)
            back = where[old_m]
            exact = 0.0
            for member in self.members[group]:
                b = member.b_rows(perms, self.scratch, new_m).double()
                a = member.a[moved].double()
                exact += float((a * (b - b[back])).sum())
            return exact
        finally:
            self.seconds["gain"] += time.perf_counter() - start

    def assign(self, cost: Tensor) -> Tensor:
        start = time.perf_counter()
        cols = assign(cost, self.solver)
        self.seconds["lap"] += time.perf_counter() - start
        self.counts["solves"] += 1
        return cols

    def objective(self, perms: Mapping[str, Tensor]) -> float:
        """Exact in float64: B permuted in its own dtype (exact), then one float64 dot product per tensor."""
        start = time.perf_counter()
        total = 0.0
        for name, groups in self.axes.items():
            moves = [(axis, perms[g]) for axis, g in enumerate(groups) if g is not None and g in perms]
            b = self.scratch.permuted(self.state_b[name].detach(), moves)
            total += self.scratch.dot64(self.state_a[name].detach(), b)
        self.seconds["objective"] += time.perf_counter() - start
        return total


def _units(spec: PermutationSpec, groups: list[str]) -> list[tuple[str, ...]]:
    """What one step of the descent solves: a group, or a tie of head groups with the tie's own group (their head
    permutation is one), in the order of their first group."""
    ties = spec.ties()
    out: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for g in groups:
        tie = spec.tie_of(g)
        if tie is None:
            out.append((g,))
        elif tie not in seen:
            seen.add(tie)
            out.append(tuple(h for h in (tie, *ties[tie]) if h in groups))
    return out


def _sweep(problem: _Problem, perms: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """One greedy pass from the input side to the output side: each group matched on the tensors whose other axes
    belong to groups already matched in this pass (or to none), the unmatched ones ignored rather than trusted
    at an arbitrary order. Returns the permutations and their versions (the cost shares cached for them)."""
    out = dict(perms)
    versions = dict.fromkeys(problem.groups, -1)
    for unit in problem.units:
        found, _ = problem.solve(unit, out, versions, settled=True)
        for group, perm in found.items():
            out[group] = perm
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
    solved_at: dict[tuple[str, ...], tuple[int, ...]] = {}  # the neighbours' versions when a group was last solved
    for _ in range(max_passes):
        before = objective
        for i in torch.randperm(len(problem.units), generator=gen).tolist():
            unit = problem.units[i]
            state = tuple(versions[h] for group in unit for h in problem.neighbours[group])
            if solved_at.get(unit) == state:
                continue
            solved_at[unit] = state
            found, costs = problem.solve(unit, perms, versions, settled=False)
            gain = sum(problem.gain(group, costs[group], perms, found[group]) for group in unit)
            if gain > 0:
                for group in unit:
                    perms[group] = found[group]
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
    solver: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Permutations (`perm[i]` = B's unit matched to A's unit i, on CPU) carrying B onto A, and diagnostics.

    Scores exactly the tensors of `state_a`/`state_b` that the spec maps (pass parameters only to leave running
    statistics out, as the aligner does). Restart 0 starts from `init` (a warm start, e.g. STE's previous step),
    else from the identity with pass 1 the input-to-output sweep (kept when it beats the identity; `sweep=False`
    leaves it out: Git Re-Basin's reference descent, kept to reproduce numbers made with it); later
    restarts start from random permutations. Every descent pass visits the groups in a fresh order drawn from a
    generator seeded with `seed`, and a run stops after a pass that improves the objective by less than a
    relative 1e-12 or after `max_passes` passes. The best restart wins; `history` is its objective before the
    first pass and after every pass. `solver` picks the LAP solver (None: `lap` from n = 128 where installed, else
    scipy; "lap"; "scipy"): they find the same optimum, so the answer changes only where a LAP has two. `phases`
    (seconds in setup, cost matrices, LAP, gains, objective) and the counts of solves, full builds, incremental
    updates and gains recomputed exactly say where the time went.
    """
    start = time.perf_counter()
    (plain, state_a), (_, state_b) = spec.plain_view(state_a), spec.plain_view(state_b)  # flatten/cat parts
    problem = _Problem(plain, state_a, state_b, solver)
    setup = time.perf_counter() - start
    gen = torch.Generator().manual_seed(seed)
    best: tuple[dict[str, Tensor], list[float], int] | None = None
    for restart in range(restarts):
        if restart == 0 and init is not None:
            perms = {g: init[g].to(problem.device) for g in problem.groups}
        elif restart == 0:
            perms = {g: torch.arange(n, device=problem.device) for g, n in problem.sizes.items()}
        else:
            perms = problem.random_start(gen)
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
        "phases": {k: round(v, 4) for k, v in {"setup": setup, **problem.seconds}.items()},  # seconds
        **problem.counts,
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
    other groups at `perms`, a group `perms` lacks in place; a head group's units within their head): for units
    another method could not place (dead on the merge data). Returns the groups of `perms`."""
    (plain, state_a), (_, state_b) = spec.plain_view(state_a), spec.plain_view(state_b)
    problem = _Problem(plain, state_a, state_b)
    current = {g: perms[g] if g in perms else torch.arange(problem.sizes[g]) for g in problem.groups}
    current = {g: p.to(problem.device) for g, p in current.items()}
    versions = {g: problem.new_version() for g in problem.groups}
    out = dict(current)
    for group, rows in units.items():
        if group not in problem.sizes or rows.numel() < 2:
            continue
        rows = rows.to(problem.device)
        cost = problem.cost(group, current, versions, settled=False)
        out[group] = current[group].clone()
        # a head group's units are rematched within their head: the head's place (σ) stays
        size = problem.sizes[group] // problem.heads[group].count if group in problem.heads else problem.sizes[group]
        for head in torch.div(rows, size, rounding_mode="floor").unique():
            chunk = rows[torch.div(rows, size, rounding_mode="floor") == head]
            if chunk.numel() > 1:
                held = current[group][chunk]
                out[group][chunk] = held[assign(cost[chunk][:, held])]
    return {g: out[g].cpu() if g in out else p for g, p in perms.items()}


def place_by_weights(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    perms: Mapping[str, Tensor],
    groups: list[str],
) -> dict[str, Tensor]:
    """Permutations for `groups`, which another method could not see (heads inside a fused attention op), by weight
    matching's cost with the other groups held at `perms`: one solve of each group or head tie among them."""
    (plain, state_a), (_, state_b) = spec.plain_view(state_a), spec.plain_view(state_b)
    problem = _Problem(plain, state_a, state_b)
    current = {g: perms[g] if g in perms else torch.arange(problem.sizes[g]) for g in problem.groups}
    current = {g: p.to(problem.device) for g, p in current.items()}
    versions = {g: problem.new_version() for g in problem.groups}
    out: dict[str, Tensor] = {}
    for unit in problem.units:
        if any(g in groups for g in unit):
            found, _ = problem.solve(unit, current, versions, settled=False)
            for group, perm in found.items():
                out[group] = current[group] = perm
                versions[group] = problem.new_version()
    return {g: p.cpu() for g, p in out.items()}


def parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters by state-dict name, detached: what weight matching scores (DESIGN §5.1)."""
    return {k: v.detach() for k, v in model.named_parameters()}


@ALIGNERS.register("weight_matching", WeightMatchingParams, label="Weight Matching", abbrev="WM")
@pairwise_aligner
def align_weight_matching(
    params: WeightMatchingParams, ref: nn.Module, other: nn.Module, ctx: MergeContext
) -> PairAlignment:
    spec = params.spec_for(ctx.spec)
    perms, info = weight_matching(
        spec,
        parameters(ref),
        parameters(other),
        seed=mix_seeds(ctx.seed, params.seed),
        max_passes=params.max_passes,
        restarts=params.restarts,
        sweep=params.start == "sweep",
    )
    info["groups_left"] = len(ctx.spec.groups) - len(spec.groups)  # align.heads / align.residual = identity
    return PairAlignment({g: Transform.permutation(p) for g, p in perms.items()}, info)


align_weight_matching.aligns_heads = True  # type: ignore[attr-defined]  # a tie of head groups is solved as one
