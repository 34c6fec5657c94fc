"""Post-merge repairs that touch no weights: `none`, and `reset_bn` (recompute BatchNorm statistics).

An average of two BatchNorm networks keeps averaged running statistics that no longer describe its own
activations; NP and the REPAIR paper recompute them on the merge data after every merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from mergebench.context import MergeContext
from mergebench.merge.registry import REPAIRS


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


@REPAIRS.register("none")
def repair_none(
    params: None, merged: nn.Module, sources: list[nn.Module], weights: list[float], ctx: MergeContext
) -> nn.Module:
    return merged.eval()


@REPAIRS.register("reset_bn")
def repair_reset_bn(
    params: None, merged: nn.Module, sources: list[nn.Module], weights: list[float], ctx: MergeContext
) -> nn.Module:
    return reset_bn(merged, ctx.seeded_fit_batches())
