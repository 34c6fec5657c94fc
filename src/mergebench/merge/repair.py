"""Post-merge repairs: `none` and `reset_bn` (recompute BatchNorm statistics on the merge data)."""

from __future__ import annotations

import torch
from torch import nn

from mergebench.context import MergeContext
from mergebench.data.loader import Batches
from mergebench.merge.registry import REPAIRS


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_bn(model: nn.Module, batches: Batches) -> nn.Module:
    """Recompute every BatchNorm's running statistics as a true cumulative average (momentum=None)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, _ in batches:
        model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


@REPAIRS.register("none")
def repair_none(params: None, merged: nn.Module, sources: list[nn.Module], weights: list[float], ctx: MergeContext):
    return merged.eval()


@REPAIRS.register("reset_bn")
def repair_reset_bn(
    params: None, merged: nn.Module, sources: list[nn.Module], weights: list[float], ctx: MergeContext
) -> nn.Module:
    return reset_bn(merged, ctx.fit_batches(shuffle=True, seed=ctx.seed))
