"""The aligner contracts, their registry and what aligners return.

Most aligners carry model B into model A's basis and keep A as is (`Aligner` → `Alignment`). A joint aligner
(ZipIt!) moves every model, model 0 included, into one shared basis at once (`JointAligner` → `JointAlignment`);
it is registered in the same registry, so `align=<name>` picks either, and the strategies ask which it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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


Assemble = Callable[[nn.Module, list[nn.Module]], nn.Module]
"""(the aggregated and repaired model, the carried models) -> the final model."""


@dataclasses.dataclass
class JointAlignment:
    """Transforms for every model (`transforms[k]` carries model k) into one shared basis, and diagnostics.

    The carried models are aggregated like aligned ones — their plain mean is the joint aligner's own merge — and
    repaired. `assemble`, when set, then builds the final model from that merge and the carried models (partial
    zipping: a shared trunk with one head per model); None: the merge is the final model.
    """

    transforms: list[dict[str, Transform]]
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    assemble: Assemble | None = None


class JointAlign(Protocol):
    def __call__(self, params: Any, models: list[nn.Module], ctx: MergeContext) -> JointAlignment: ...


@dataclasses.dataclass(frozen=True)
class JointAligner:
    """A joint aligner as an ALIGNERS entry: `ALIGNERS.register(name, Params, ...)(JointAligner(name, fn))`.

    Strategies call `align` with all the models they merge at once (`merge.strategies.align_all`). It cannot keep
    a reference model as is, so the one-pair contract is refused rather than approximated."""

    name: str
    align: JointAlign

    def __call__(self, params: Any, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> Alignment:
        raise TypeError(
            f"align={self.name} moves every model into a shared basis, model 0 too: "
            "call it through mergebench.merge.strategies.align_all"
        )


ALIGNERS: Registry[Aligner] = Registry("align", "mergebench.align")
