"""The aligner contract, its registry and what every aligner returns."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from torch import nn

from mergebench.context import MergeContext
from mergebench.registry import Registry
from mergebench.spec import Transform


@dataclasses.dataclass
class Alignment:
    """Transforms that carry model B into model A's basis, plus the aligner's own diagnostics."""

    transforms: dict[str, Transform]
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)


class Aligner(Protocol):
    """Carries model `other` into model `ref`'s basis; `ref` is kept as is. `params` is the dataclass the aligner
    registered (None without one); an empty `transforms` is the identity."""

    def __call__(self, params: Any, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> Alignment: ...


ALIGNERS: Registry[Aligner] = Registry("align", "mergebench.align")
