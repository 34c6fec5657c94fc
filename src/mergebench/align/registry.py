"""The aligner contract, its registry and what aligners return.

Every aligner takes the K models a strategy merges at once and returns one `Alignment`: per model, the transforms
that carry it into the merge's basis. Most aligners carry model B into model A's basis and keep A as is: they are
written for one pair and registered through `pairwise_aligner`, which aligns each model k ≥ 1 to model 0. A joint
aligner (ZipIt!, C2M3) matches all K models at once; ZipIt! moves model 0 too, into a shared basis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

from mergebench.context import MergeContext
from mergebench.registry import Registry
from mergebench.spec import Transform

Assemble = Callable[[nn.Module, list[nn.Module]], nn.Module]
"""(the aggregated and repaired model, the carried models) -> the final model."""


@dataclasses.dataclass
class Alignment:
    """`transforms[k]` carries model k into the merge's basis (empty: model k stays as it is), plus the aligner's
    diagnostics. The carried models are aggregated and repaired; `assemble`, when set, then builds the final model
    from that merge and the carried models (partial zipping: a shared trunk with one head per model)."""

    transforms: list[dict[str, Transform]]
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    assemble: Assemble | None = None


class Aligner(Protocol):
    """Carries `models` into one basis. `params` is the dataclass the aligner registered (None without one).
    `keeps_first` says whether model 0 always stays as it is (MergeMany aligns each model to a fixed reference)."""

    keeps_first: bool

    def __call__(self, params: Any, models: list[nn.Module], ctx: MergeContext) -> Alignment: ...


@dataclasses.dataclass
class PairAlignment:
    """What a pairwise aligner returns: transforms that carry model B into model A's basis, and diagnostics."""

    transforms: dict[str, Transform]
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)


PairAligner = Callable[[Any, nn.Module, nn.Module, MergeContext], PairAlignment]


def pairwise_aligner(align_pair: PairAligner) -> Aligner:
    """The K-model aligner of one written for a pair (`align_pair(params, ref, other, ctx)` carries `other` into
    `ref`'s basis): every model k ≥ 1 aligned to model 0, which stays as it is. With more than two models each
    pair's diagnostics are prefixed by its model's index (`3_objective`)."""

    @functools.wraps(align_pair)
    def align(params: Any, models: list[nn.Module], ctx: MergeContext) -> Alignment:
        transforms: list[dict[str, Transform]] = [{}]
        diagnostics: dict[str, Any] = {}
        for k, other in enumerate(models[1:], start=1):
            result = align_pair(params, models[0], other, ctx)
            transforms.append(result.transforms)
            diagnostics.update({f"{k}_{key}" if len(models) > 2 else key: v for key, v in result.diagnostics.items()})
        return Alignment(transforms, diagnostics)

    align.keeps_first = True  # type: ignore[attr-defined]
    return align  # type: ignore[return-value]


ALIGNERS: Registry[Aligner] = Registry("align", "mergebench.align")
