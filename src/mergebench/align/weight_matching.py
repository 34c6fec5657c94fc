"""Git Re-Basin weight matching: coordinate descent over groups, one linear assignment per group and step.

No data is needed. For group g the assignment maximises Σ_w ⟨W_A[w], W_B[w] permuted⟩ over every tensor
that touches g (BN scale, shift and running statistics included), with the other groups held fixed. The result
depends on the order groups are visited and can stall in a local optimum (Git Re-Basin issue #8), hence a seeded
order per pass and optional restarts.

Speed without changing the answer: the n×n cost matrices (the only O(n³)-ish work, GEMMs on the model's device)
run in the weights' own dtype, and an assignment is accepted only if it raises the group's terms of the objective
evaluated in float64 — so the float64 objective never decreases, whatever the GEMM's rounding. A group whose
neighbours (the other groups on its tensors' axes) have not changed since it was last solved has the same cost
matrix, hence the same assignment, and is skipped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mergebench.align.registry import ALIGNERS, Alignment
from mergebench.align.spec import PermutationSpec, Transform
from mergebench.errors import ConfigError

if TYPE_CHECKING:  # the context imports align.spec, and so this package
    from mergebench.context import MergeContext


@dataclasses.dataclass
class WeightMatchingParams:
    seed: int = 0
    max_passes: int = 100
    restarts: int = 1

    def check(self) -> None:
        if self.max_passes < 1:
            raise ConfigError(f"max_passes={self.max_passes} must be >= 1")
        if self.restarts < 1:
            raise ConfigError(f"restarts={self.restarts} must be >= 1")


class _Member:
    """One tensor seen from one of its groups: that group's axis first, A flattened, B still to permute."""

    def __init__(self, a: Tensor, b: Tensor, axis: int, groups: tuple[str | None, ...]) -> None:
        order = [axis, *(i for i in range(a.dim()) if i != axis)]
        self.a = a.detach().permute(order).reshape(a.shape[axis], -1)
        self.b = b.detach().permute(order).contiguous()
        self.others = [(pos, groups[i]) for pos, i in enumerate(order) if pos > 0 and groups[i] is not None]
        # a bound on the GEMM's rounding error for entry (i, j): eps·k·‖a_i‖·‖b_j‖ (row norms ignore permutations)
        self.a_norm = self.a.double().norm(dim=1)
        self.b_norm = self.b.reshape(self.b.shape[0], -1).double().norm(dim=1)
        self.rounding = torch.finfo(a.dtype).eps * self.a.shape[1]

    def b_rows(self, perms: Mapping[str, Tensor]) -> Tensor:
        """B's units as rows, every other axis permuted by its group's current permutation."""
        t = self.b
        for pos, group in self.others:
            t = t.index_select(pos, perms[group])
        return t.reshape(t.shape[0], -1)


class _Problem:
    """Every (tensor, axis) that a group acts on, and the objective Σ_w ⟨W_A[w], π(W_B)[w]⟩ in float64."""

    def __init__(self, spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
        axes = {k: g for k, g in spec.axes.items() if any(g) and state_a[k].is_floating_point()}
        self.axes = axes
        self.groups = [g for g in spec.groups if any(k in axes for k, _ in spec.members(g))]
        self.members = {
            g: [_Member(state_a[k], state_b[k], ax, axes[k]) for k, ax in spec.members(g) if k in axes]
            for g in self.groups
        }
        self.neighbours = {g: sorted({h for m in self.members[g] for _, h in m.others}) for g in self.groups}
        self.sizes = {g: spec.group_size(g, state_a) for g in self.groups}
        self.state_a, self.state_b = state_a, state_b
        self.device = state_a[next(iter(axes))].device

    def cost(self, group: str, perms: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """cost[i, j] = gain of matching B's unit j to A's unit i, the other groups held at `perms` (a GEMM in the
        weights' dtype, summed in float64), and each member's permuted B rows for `gain`."""
        n = self.sizes[group]
        total = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        rows = [m.b_rows(perms) for m in self.members[group]]
        for member, b in zip(self.members[group], rows):
            total += member.a @ b.T
        return total, rows

    def gain(self, group: str, cost: Tensor, rows: list[Tensor], old: Tensor, new: Tensor) -> float:
        """The objective's change when `group` goes from `old` to `new`: read off the cost matrix when it exceeds
        the GEMM's rounding bound, otherwise recomputed exactly in float64 (only the moved units count)."""
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
        for member, b in zip(self.members[group], rows):
            a = member.a[moved].double()
            exact += float((a * (b[new[moved]].double() - b[old[moved]].double())).sum())
        return exact

    def objective(self, perms: Mapping[str, Tensor]) -> float:
        total = 0.0
        for name, groups in self.axes.items():
            b = self.state_b[name].detach().double()
            for axis, group in enumerate(groups):
                if group is not None:
                    b = b.index_select(axis, perms[group])
            total += float((self.state_a[name].detach().double() * b).sum())
        return total


def _descend(
    problem: _Problem, perms: dict[str, Tensor], gen: torch.Generator, max_passes: int
) -> tuple[dict[str, Tensor], list[float]]:
    """Passes of one assignment per group; an assignment is taken only when it raises the objective (by a margin
    beyond rounding, or checked exactly), so the tracked objective never decreases."""
    objective = problem.objective(perms)
    history = [objective]
    changes = dict.fromkeys(problem.groups, 0)  # how often each group's permutation has changed
    solved_at: dict[str, tuple[int, ...]] = {}  # the neighbours' change counts when a group was last solved
    for _ in range(max_passes):
        for i in torch.randperm(len(problem.groups), generator=gen).tolist():
            group = problem.groups[i]
            state = tuple(changes[h] for h in problem.neighbours[group])
            if solved_at.get(group) == state:
                continue
            solved_at[group] = state
            cost, rows = problem.cost(group, perms)
            _, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
            candidate = torch.from_numpy(cols).to(problem.device)
            gain = problem.gain(group, cost, rows, perms[group], candidate)
            if gain > 0:
                perms[group] = candidate
                changes[group] += 1
                objective += gain
        history.append(objective)
        if history[-1] - history[-2] < 1e-12 * abs(history[-2]):
            break
    return perms, history


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    seed: int,
    max_passes: int = 100,
    restarts: int = 1,
    init: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Permutations (`perm[i]` = B's unit matched to A's unit i, on CPU) carrying B onto A, and diagnostics.

    Restart 0 starts from `init` (a warm start, e.g. STE's previous step) or the identity; later restarts from
    random permutations. Every pass visits the groups in a fresh order drawn from a generator seeded with `seed`,
    and a run stops after a pass that improves the objective by less than a relative 1e-12. The best restart
    wins; `history` is its objective before the first pass and after every pass.
    """
    start = time.perf_counter()
    problem = _Problem(spec, state_a, state_b)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[dict[str, Tensor], list[float], int] | None = None
    for restart in range(restarts):
        if restart == 0:
            perms = {g: torch.arange(n) if init is None else init[g].cpu() for g, n in problem.sizes.items()}
        else:
            perms = {g: torch.randperm(n, generator=gen) for g, n in problem.sizes.items()}
        perms, history = _descend(problem, {g: p.to(problem.device) for g, p in perms.items()}, gen, max_passes)
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


def mix_seeds(*seeds: int) -> int:
    """One well-mixed seed from several (the run's seed, the aligner's own), without Python's hash()."""
    return int(np.random.SeedSequence(list(seeds)).generate_state(1)[0])


@ALIGNERS.register("weight_matching", WeightMatchingParams)
def align_weight_matching(
    params: WeightMatchingParams, ref: nn.Module, other: nn.Module, ctx: MergeContext
) -> Alignment:
    perms, info = weight_matching(
        ctx.spec,
        ref.state_dict(),
        other.state_dict(),
        seed=mix_seeds(ctx.seed, params.seed),
        max_passes=params.max_passes,
        restarts=params.restarts,
    )
    return Alignment({g: Transform.permutation(p) for g, p in perms.items()}, info)
