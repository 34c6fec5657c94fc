"""No alignment: the models are merged in the bases they were trained in ("Direct averaging", "Naïve")."""

from __future__ import annotations

from torch import nn

from mergebench.align.registry import ALIGNERS, Alignment
from mergebench.context import MergeContext


@ALIGNERS.register("identity", label="Direct averaging", abbrev="Direct")
def align_identity(params: None, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> Alignment:
    return Alignment(transforms={})
