"""OT fusion (Singh & Jaggi 2020): per group, an optimal transport plan between A's units and B's carries B into
A's basis.

Groups are visited from the input side to the output side. The ground cost between A's unit i and B's unit j is
the squared Euclidean distance of either their incoming weights (`cost=weights`: every parameter whose output
axis is the group, B's already carried into A's basis on its input axes by the groups before it; a residual
stream uses only the tensors whose inputs are settled, like weight matching's sweep) or their activations on the
merge data (`cost=acts`: E[(a_i − b_j)²], from the same streamed statistics as `permute`). Attention heads
(`spec.Heads`) are matched as whole heads, then unit by unit within each head, on the same ground cost: a
permutation (a plan that mixed units across heads would change what attention computes). With uniform marginals
μ (A's units) and ν (B's), the plan T (n_A × n_B) comes from exact OT (`ot.emd`) or entropic OT (`ot.sinkhorn`,
`reg` relative to the cost's largest entry, so one value suits every layer).

B's units are carried by the plan scaled by the inverse marginal: unit i of the aligned B is Σ_j T_ij/μ_i · b_j
(rows summing to 1), and the consuming input axes take diag(1/ν)·Tᵀ. With equal widths that is the OT fusion
code's own map on both sides (and, exact OT giving a vertex of the Birkhoff polytope, a permutation, returned as
one). With different widths the merged model takes A's widths; the input side then sums, rather than averages,
the weights of the B units merged into one A unit — the least-squares choice for the averaged feature, and an
exact inverse when B's units are only copied (A wider) — where the OT fusion code averages them and so scales the
next layer's input by n_A/n_B.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mergebench.align.activations import GroupStats, activation_stats
from mergebench.align.assignment import assign_heads
from mergebench.align.registry import ALIGNERS, PairAlignment, pairwise_aligner
from mergebench.align.weight_matching import parameters
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.spec import PermutationSpec, Transform, apply_transforms

COSTS = ("weights", "acts")
SOLVERS = ("emd", "sinkhorn")
EMD_MAX_ITER = 10_000_000  # network-simplex pivots: POT's default 100,000 can stop short of optimal at n = 512


@dataclasses.dataclass
class OTParams:
    cost: str = "weights"
    solver: str = "emd"
    reg: float = 0.01
    max_iter: int = 10000
    batch_size: int | None = None

    def check(self) -> None:
        if self.cost not in COSTS:
            raise ConfigError(f"cost={self.cost!r} is not known; allowed: {', '.join(COSTS)}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver={self.solver!r} is not known; allowed: {', '.join(SOLVERS)}")
        if self.reg <= 0:
            raise ConfigError(f"reg={self.reg} must be > 0")
        if self.max_iter < 1:
            raise ConfigError(f"max_iter={self.max_iter} must be >= 1")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive integer or null (eval batch size)")


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """‖a_i − b_j‖² for the rows of a and b, in float64, clamped at 0 against rounding."""
    a, b = a.double(), b.double()
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def weight_cost(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    group: str,
    done: Mapping[str, Transform],
) -> Tensor:
    """Distances between A's and B's incoming weights of `group`, B's input axes carried by the maps in `done`."""
    incoming = [
        k for k, g in spec.axes.items() if g and g[0] == group and k in state_a and state_a[k].is_floating_point()
    ]
    if not incoming:
        raise ValueError(f"ot: group {group!r} is the output axis of no parameter; no incoming weights to compare")
    settled = [k for k in incoming if all(g is None or g in done for g in spec.axes[k][1:])]
    names = settled or incoming
    moved = apply_transforms({k: state_b[k] for k in names}, spec, done)
    rows_a = torch.cat([state_a[k].reshape(state_a[k].shape[0], -1) for k in names], 1)
    rows_b = torch.cat([moved[k].reshape(moved[k].shape[0], -1) for k in names], 1)
    return squared_distances(rows_a, rows_b)


def activation_cost(stats: GroupStats) -> Tensor:
    """E[(a_i − b_j)²] over the merge data: E[a_i²] + E[b_j²] − 2·E[a_i b_j], from means and covariances."""
    second_a = stats.cov_a.diagonal() + stats.mean_a.pow(2)
    second_b = stats.cov_b.diagonal() + stats.mean_b.pow(2)
    cross = stats.cov_ab + torch.outer(stats.mean_a, stats.mean_b)
    return (second_a[:, None] + second_b[None, :] - 2 * cross).clamp_min(0)


def transport_plan(cost: Tensor, solver: str, reg: float, max_iter: int) -> tuple[Tensor, tuple[int, float] | None]:
    """The plan between uniform marginals (float64, on CPU), and for sinkhorn its iterations and final violation of
    B's marginal (None for emd).

    The cost is divided by its largest entry first: exact OT does not change, and `reg` means the same on every
    layer whatever its scale."""
    import ot  # POT imports scikit-learn (0.3–0.6 s): every run discovers this aligner, only OT runs pay for it

    n_a, n_b = cost.shape
    scaled = (cost / cost.max() if cost.max() > 0 else cost).cpu().numpy()
    mu, nu = np.full(n_a, 1.0 / n_a), np.full(n_b, 1.0 / n_b)
    if solver == "emd":
        return torch.from_numpy(ot.emd(mu, nu, scaled, numItermax=EMD_MAX_ITER)), None
    plan, log = ot.sinkhorn(
        mu, nu, scaled, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=1e-9, log=True, warn=False
    )
    return torch.from_numpy(np.asarray(plan)), (int(log["niter"]) + 1, float(log["err"][-1]))


def plan_transform(plan: Tensor) -> Transform:
    """The plan as a map of B's units into A's basis: a permutation when it is one (exact OT, equal widths), else
    rows T_i·/μ_i on output axes and diag(1/ν)·Tᵀ (given as the inverse) on input axes, μ and ν its marginals."""
    n_a, n_b = plan.shape
    if n_a == n_b:
        perm = plan.argmax(1)
        vertex = torch.zeros_like(plan).scatter_(1, perm[:, None], 1.0 / n_a)
        if torch.allclose(plan, vertex, rtol=0, atol=1e-9 / n_a) and torch.unique(perm).numel() == n_a:
            return Transform.permutation(perm)
    matrix = plan / plan.sum(1, keepdim=True)
    inverse = (plan / plan.sum(0, keepdim=True)).T
    return Transform.dense(matrix, inverse)


def ot_fusion(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    stats: Mapping[str, GroupStats] | None = None,
    solver: str = "emd",
    reg: float = 0.01,
    max_iter: int = 10000,
) -> tuple[dict[str, Transform], dict[str, Any]]:
    """Transforms carrying B into A's basis, group by group from the input side, and diagnostics. The ground cost is
    the activations' when `stats` is given, else the incoming weights' (of the tensors in `state_a`/`state_b`)."""
    start = time.perf_counter()
    (plain, state_a), (_, state_b) = spec.plain_view(state_a), spec.plain_view(state_b)  # flatten/cat parts
    transforms: dict[str, Transform] = {}
    total, sinkhorn = 0.0, []
    ties = spec.ties()

    def ground_cost(group: str) -> Tensor:
        if stats is not None and group in stats:
            return activation_cost(stats[group])
        # weights: asked for, or a group no module output holds alone (a segment of a wider axis)
        return weight_cost(plain, state_a, state_b, group, transforms)

    for group in spec.groups:
        if group in transforms:
            continue
        tie = spec.tie_of(group)
        if tie is not None:  # attention heads: whole heads matched at once, then units within each (a permutation)
            members = ties[tie]
            costs = [ground_cost(g) for g in members]
            own = ground_cost(tie) if tie in spec.groups else None
            count = spec.heads[members[0]].count
            found, sigma = assign_heads([-c for c in costs], count, None if own is None else -own)
            for g, perm, cost in zip(members, found, costs, strict=True):
                transforms[g] = Transform.permutation(perm)
                total += float(cost.cpu()[torch.arange(len(perm)), perm.cpu()].sum()) / len(perm)
            if own is not None:
                transforms[tie] = Transform.permutation(sigma)
            continue
        cost = ground_cost(group)
        plan, progress = transport_plan(cost, solver, reg, max_iter)
        transforms[group] = plan_transform(plan)
        total += float((plan * cost.cpu()).sum())
        if progress is not None:
            sinkhorn.append(progress)
    info: dict[str, Any] = {
        "cost": "acts" if stats is not None else "weights",
        "solver": solver,
        "transport_cost": total,
        "dense_groups": sum(not t.is_permutation for t in transforms.values()),
    }
    if solver == "sinkhorn":
        iterations, errors = zip(*sinkhorn)
        info |= {"reg": reg, "sinkhorn_iterations_max": max(iterations), "sinkhorn_marginal_error_max": max(errors)}
    info["seconds"] = time.perf_counter() - start
    return transforms, info


@ALIGNERS.register("ot", OTParams, label="OT Fusion", abbrev="OT")
@pairwise_aligner
def align_ot(params: OTParams, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> PairAlignment:
    start = time.perf_counter()
    stats = None
    if params.cost == "acts":
        state_a, state_b = ref.state_dict(), other.state_dict()
        if any(ctx.spec.group_size(g, state_a) != ctx.spec.group_size(g, state_b) for g in ctx.spec.groups):
            raise ConfigError("align.cost=acts needs models of equal widths (the statistics pair units); use weights")
        batches = ctx.fit_batches(batch_size=params.batch_size or ctx.eval_batch_size)
        stats = activation_stats(ctx.spec, ref, other, batches)
    transforms, info = ot_fusion(
        ctx.spec,
        parameters(ref),
        parameters(other),
        stats=stats,
        solver=params.solver,
        reg=params.reg,
        max_iter=params.max_iter,
    )
    info["seconds"] = time.perf_counter() - start
    return PairAlignment(transforms, info)


align_ot.aligns_heads = True  # type: ignore[attr-defined]  # heads matched as whole heads on the ground cost
