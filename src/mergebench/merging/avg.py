"""The `avg` aggregator: scalar interpolation W = α·W_A + (1-α)·W_B' for two models, the plain mean for K models
(the arithmetic is in `mergebench.weights`)."""

from __future__ import annotations

import dataclasses

from torch import nn

from mergebench.checkpoints import load_state
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.merging.registry import AGGREGATORS, Merged
from mergebench.weights import interpolation_weights, weighted_state


@dataclasses.dataclass
class AvgParams:
    alpha: float = 0.5

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha} must be in [0, 1]")

    def check_models(self, num_models: int) -> None:
        """A scalar α weighs model A against model B; K > 2 models are averaged plainly, so α would be ignored."""
        if num_models > 2 and self.alpha != 0.5:
            raise ConfigError(f"alpha={self.alpha} only applies to two models; {num_models} are averaged (α = 1/K)")


@AGGREGATORS.register("avg", AvgParams, label="{align}")  # a plain average is named after its aligner
def aggregate_avg(params: AvgParams, models: list[nn.Module], ctx: MergeContext) -> Merged:
    weights = interpolation_weights(len(models), params.alpha)
    merged = ctx.build_model()
    load_state(merged, weighted_state(models, weights))
    return Merged(merged, weights, {"alpha": weights[0]})
