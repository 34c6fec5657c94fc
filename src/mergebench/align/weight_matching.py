"""Git Re-Basin weight matching: coordinate descent over groups, one linear assignment per group and step.

No data is needed. For group g the assignment maximises Σ_w ⟨W_A[w], W_B[w] permuted⟩ over every tensor
that touches g (BN scale, shift and running statistics included), with the other groups held fixed, so the
objective Σ_w ⟨W_A[w], π(W_B)[w]⟩ never decreases. The result depends on the order groups are visited and
can stall in a local optimum (Git Re-Basin issue #8), hence a seeded order per pass and optional restarts.
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


class _Problem:
    """The tensors of A (float64, each group's axis moved first and flattened) and B, per group."""

    def __init__(self, spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
        self.axes = {k: g for k, g in spec.axes.items() if any(g) and state_a[k].is_floating_point()}
        self.groups = [g for g in spec.groups if any(k in self.axes for k, _ in spec.members(g))]
        self.members = {g: [(k, ax) for k, ax in spec.members(g) if k in self.axes] for g in self.groups}
        self.sizes = {g: spec.group_size(g, state_a) for g in self.groups}
        self.a = {k: state_a[k].detach().double() for k in self.axes}
        self.b = {k: state_b[k].detach().double() for k in self.axes}
        self.a_flat = {
            (k, ax): self.a[k].movedim(ax, 0).reshape(self.a[k].shape[ax], -1)
            for g in self.groups
            for k, ax in self.members[g]
        }
        self.device = next(iter(self.a.values())).device

    def permuted_b(self, name: str, perms: Mapping[str, Tensor], skip_axis: int | None = None) -> Tensor:
        t = self.b[name]
        for axis, group in enumerate(self.axes[name]):
            if group is not None and axis != skip_axis:
                t = t.index_select(axis, perms[group])
        return t

    def cost(self, group: str, perms: Mapping[str, Tensor]) -> Tensor:
        """cost[i, j] = gain of matching B's unit j to A's unit i, the other groups held at `perms`."""
        n = self.sizes[group]
        total = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for name, axis in self.members[group]:
            b = self.permuted_b(name, perms, skip_axis=axis).movedim(axis, 0).reshape(n, -1)
            total += self.a_flat[(name, axis)] @ b.T
        return total

    def objective(self, perms: Mapping[str, Tensor]) -> float:
        return sum(float((self.a[k] * self.permuted_b(k, perms)).sum()) for k in self.axes)


def _descend(
    problem: _Problem, perms: dict[str, Tensor], gen: torch.Generator, max_passes: int
) -> tuple[dict[str, Tensor], list[float]]:
    history = [problem.objective(perms)]
    for _ in range(max_passes):
        for i in torch.randperm(len(problem.groups), generator=gen).tolist():
            group = problem.groups[i]
            _, cols = linear_sum_assignment(problem.cost(group, perms).cpu().numpy(), maximize=True)
            perms[group] = torch.from_numpy(cols).to(problem.device)
        history.append(problem.objective(perms))
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
        "objective": history[-1],
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
