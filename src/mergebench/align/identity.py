"""No alignment: the models are merged in the bases they were trained in ("Direct averaging", "Naïve")."""

from __future__ import annotations

from torch import nn

from mergebench.align.registry import ALIGNERS, PairAlignment, pairwise_aligner
from mergebench.context import MergeContext


@ALIGNERS.register("identity", label="Direct averaging", abbrev="Direct")
@pairwise_aligner
def align_identity(params: None, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> PairAlignment:
    return PairAlignment(transforms={})
