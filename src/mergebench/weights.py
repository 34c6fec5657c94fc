"""Shared weight arithmetic below every plugin: weighted and plain means of state dicts, the one plain-mean model
that aligners score candidates with and MergeMany aligns to, and the BatchNorm reset (NP and REPAIR recompute
statistics after every merge). Aligners and aggregators both use these, so they live beneath both."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mergebench.checkpoints import load_state
from mergebench.context import MergeContext


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm of any dimension: found by isinstance, so BatchNorm1d is never skipped."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorms(model))


@torch.no_grad()
def reset_bn(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], extra: Sequence[nn.modules.batchnorm._BatchNorm] = ()
) -> nn.Module:
    """Recompute every BatchNorm's running statistics over `batches` as a true cumulative average (momentum=None,
    train-mode forward passes, no gradients); the model is returned in eval mode with momenta restored.

    `extra` are BatchNorms hooked onto the model from outside (REPAIR's inserted norms), reset in the same pass.
    """
    norms = batchnorms(model) + list(extra)
    if not norms:
        return model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    model.train()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
            m.eval()
    return model.eval()


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
    load_state(model, weighted_average(states, uniform_weights(len(states))))
    if has_batchnorm(model):
        reset_bn(model, ctx.seeded_fit_batches())
    return model.eval()
