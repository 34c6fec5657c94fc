"""No alignment: the models are merged in the bases they were trained in ("Direct averaging", "Naïve")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from mergebench.align.registry import ALIGNERS, Alignment

if TYPE_CHECKING:  # the context imports align.spec, and so this package
    from mergebench.context import MergeContext


@ALIGNERS.register("identity")
def align_identity(params: None, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> Alignment:
    return Alignment(transforms={})
