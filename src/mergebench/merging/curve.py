"""The interpolation curve between model A and the aligned model B, and its barriers.

The curve is the scalar average `α·W_A + (1-α)·W_B'` at N evenly spaced α (α is model A's weight, so α = 1 is
model A and α = 0 the aligned model B), each point repaired as the run's repair says. A barrier is the largest
gap between the curve and the straight line joining its endpoints: how far accuracy drops below the line, how far
the loss rises above it (Frankle et al.; Entezari et al.). It is never negative, since the endpoints lie on the
line; a convex loss curve has none.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from mergebench.context import MergeContext
from mergebench.merging.avg import AvgParams, aggregate_avg

# metric -> (the barrier's name, +1 when higher is better)
BARRIER_METRICS = {"top1": ("acc_barrier", 1.0), "loss": ("loss_barrier", -1.0)}
MIDPOINT = 0.5
CURVE_AGG = "avg"  # the aggregator each point of the curve is (its results are labelled as that merge)


def curve_alphas(points: int) -> list[float]:
    """α = 0, 1/(N-1), …, 1."""
    return [i / (points - 1) for i in range(points)]


def interpolation_curve(
    model_a: nn.Module, model_b: nn.Module, points: int, repair: Any, ctx: MergeContext
) -> Iterator[tuple[float, nn.Module]]:
    """(α, the repaired average at α) for every α of the curve; `repair` is the run's repair Component."""
    for alpha in curve_alphas(points):
        merged = aggregate_avg(AvgParams(alpha), [model_a, model_b], ctx)
        yield alpha, repair.factory(repair.params, merged.model, [model_a, model_b], merged.weights, ctx)


def barrier(alphas: Sequence[float], values: Sequence[float], higher_is_better: bool) -> float:
    """The largest gap between `values` and the line through the endpoints (alphas ascending from 0 to 1)."""
    first, last = values[0], values[-1]
    sign = 1.0 if higher_is_better else -1.0
    gaps = [sign * ((1 - a) * first + a * last - v) for a, v in zip(alphas, values)]
    return max(0.0, max(gaps))


def barriers(points: Sequence[tuple[float, dict[str, dict[str, float]]]]) -> dict[str, dict[str, float]]:
    """Barrier rows from the curve's results `[(α, {subset: {metric: value}})]`, per subset: `acc_barrier`
    (accuracy points) and `loss_barrier` over the whole curve, and `acc_barrier_mid` / `loss_barrier_mid` at
    α = 0.5 when the curve has that point (odd N)."""
    alphas = [a for a, _ in points]
    mid = next((i for i, a in enumerate(alphas) if abs(a - MIDPOINT) < 1e-9), None)
    out: dict[str, dict[str, float]] = {}
    for subset in points[0][1]:
        row = {}
        for metric, (name, sign) in BARRIER_METRICS.items():
            values = [results[subset][metric] for _, results in points]
            row[name] = barrier(alphas, values, higher_is_better=sign > 0)
            if mid is not None:
                row[f"{name}_mid"] = sign * ((1 - MIDPOINT) * values[0] + MIDPOINT * values[-1] - values[mid])
        out[subset] = row
    return out
