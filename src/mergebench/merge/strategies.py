"""K-model strategies: in which order models are aligned, aggregated and repaired."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from torch import nn

from mergebench.align.spec import apply_transforms
from mergebench.context import MergeContext
from mergebench.merge.registry import STRATEGIES, Merged


@dataclasses.dataclass(frozen=True)
class Methods:
    """The chosen aligner, aggregator and repair (config Components: name, factory, params)."""

    align: Any
    agg: Any
    repair: Any


def align_to(
    ref: nn.Module, others: list[nn.Module], methods: Methods, ctx: MergeContext
) -> tuple[list[nn.Module], dict]:
    """Align every model in `others` to `ref`; returns [ref, *aligned] and the aligners' diagnostics."""
    aligned, diagnostics = [ref], {}
    start = time.perf_counter()
    for i, model in enumerate(others, start=1):
        result = methods.align.factory(methods.align.params, ref, model, ctx)
        copy = ctx.build_model()
        copy.load_state_dict(apply_transforms(model.state_dict(), ctx.spec, result.transforms))
        aligned.append(copy)
        diagnostics.update(
            {f"align{i}_{k}" if len(others) > 1 else f"align_{k}": v for k, v in result.diagnostics.items()}
        )
    diagnostics["align_s"] = time.perf_counter() - start
    return aligned, diagnostics


def aggregate_and_repair(models: list[nn.Module], methods: Methods, ctx: MergeContext) -> Merged:
    start = time.perf_counter()
    merged = methods.agg.factory(methods.agg.params, models, ctx)
    merged.diagnostics["agg_s"] = time.perf_counter() - start
    start = time.perf_counter()
    merged.model = methods.repair.factory(methods.repair.params, merged.model, models, merged.weights, ctx)
    merged.diagnostics["repair_s"] = time.perf_counter() - start
    return merged


@STRATEGIES.register("all_to_one")
def all_to_one(params: None, models: list[nn.Module], methods: Methods, ctx: MergeContext) -> Merged:
    """Align every model to model 0, then aggregate all at once (NP Fig. 1 baselines)."""
    aligned, diagnostics = align_to(models[0], models[1:], methods, ctx)
    merged = aggregate_and_repair(aligned, methods, ctx)
    merged.diagnostics = {**diagnostics, **merged.diagnostics}
    return merged
