"""Averages of aligned models: scalar interpolation W = α·W_A + (1-α)·W_B' for two models, the plain mean for K
models, and the one plain-mean model that aligners score candidates with and MergeMany aligns to."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.merge.registry import AGGREGATORS, Merged
from mergebench.merge.reset_bn import has_batchnorm, reset_bn


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


def weighted_state(models: list[nn.Module], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k · state_k of the models' state dicts (see `weighted_average`)."""
    return weighted_average([m.state_dict() for m in models], weights)


def weighted_average(states: list[Mapping[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k · state_k for every float tensor (buffers too); integer buffers are taken from state 0."""
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            out[key] = sum(w * s[key] for w, s in zip(weights, states))
        else:
            out[key] = ref.clone()
    return out


def uniform_weights(num_models: int) -> list[float]:
    """1/K for each of K models: the plain mean every aggregator starts from or falls back to."""
    return [1.0 / num_models] * num_models


def interpolation_weights(num_models: int, alpha: float) -> list[float]:
    return [alpha, 1.0 - alpha] if num_models == 2 else uniform_weights(num_models)


def mean_model(states: list[Mapping[str, torch.Tensor]], ctx: MergeContext) -> nn.Module:
    """The plain average of (aligned) states as a model in eval mode, with BatchNorm statistics recomputed on the
    merge data as the pipeline's reset_bn would: aligners judge their candidates (CCA's γ, STE's permutation) as
    they would be used, and MergeMany's activation-based aligners see sensible units."""
    model = ctx.build_model()
    model.load_state_dict(weighted_average(states, uniform_weights(len(states))))
    if has_batchnorm(model):
        reset_bn(model, ctx.seeded_fit_batches())
    return model.eval()


@AGGREGATORS.register("avg", AvgParams, label="{align}")  # a plain average is named after its aligner
def aggregate_avg(params: AvgParams, models: list[nn.Module], ctx: MergeContext) -> Merged:
    weights = interpolation_weights(len(models), params.alpha)
    merged = ctx.build_model()
    merged.load_state_dict(weighted_state(models, weights))
    return Merged(merged, weights, {"alpha": weights[0]})
