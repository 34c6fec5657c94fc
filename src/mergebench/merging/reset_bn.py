"""Post-merge repairs that touch no weights: `none`, and `reset_bn` (recompute BatchNorm statistics).

An average of two BatchNorm networks keeps averaged running statistics that no longer describe its own
activations; NP and the REPAIR paper recompute them on the merge data after every merge.
"""

from __future__ import annotations

from torch import nn

from mergebench.context import MergeContext
from mergebench.merging.registry import REPAIRS
from mergebench.weights import reset_bn


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
