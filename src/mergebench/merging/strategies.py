"""K-model strategies: in which order models are aligned, aggregated and repaired.

- all_to_one: align every model to model 0, aggregate all at once (NP Fig. 1 baselines).
- pairwise: NP §III-C: merge random pairs (seeded order), then pairs of the results, until one model remains.
- merge_many: Git Re-Basin's MergeMany: align each model to the average of the others, a few rounds, then aggregate.

A joint aligner (ZipIt!) moves all the models it is given into one shared basis at once, model 0 included: every
strategy aligns through `align_all`, which calls it with all the models (all_to_one, merge_many) or the pair
(pairwise) being merged.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from mergebench.align.registry import Alignment, Assemble
from mergebench.align.weight_matching import parameters, place_by_weights
from mergebench.checkpoints import load_state
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.merging.registry import STRATEGIES, Merged, Methods
from mergebench.spec import Transform, apply_transforms
from mergebench.weights import mean_model, uniform_weights


@dataclasses.dataclass
class StrategyParams:
    """One schema for every strategy, so `strategy.*` keys stay valid whichever strategy a sweep picks."""

    rounds: int = 3  # merge_many: at most this many alignment rounds (stops early once no permutation changes)
    order_seed: int | None = None  # pairwise pairing / merge_many visiting order; null = the run's seed

    def check(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")


def models_per_aggregation(strategy: str, num_models: int) -> int:
    return 2 if strategy == "pairwise" else num_models


def check_combination(strategy: str, num_models: int, agg_name: str, agg_params: Any) -> None:
    """Fail before any training when the aggregator cannot honour its parameters with this many models at once."""
    check = getattr(agg_params, "check_models", None)
    if check is None:
        return
    try:
        check(models_per_aggregation(strategy, num_models))
    except ConfigError as err:
        raise ConfigError(
            f"agg.{err} (agg={agg_name}, strategy={strategy}, data.num_models={num_models}; "
            "strategy=pairwise merges two at a time)"
        ) from None


def carry(model: nn.Module, transforms: dict[str, Transform], ctx: MergeContext) -> nn.Module:
    """A fresh copy of `model` with `transforms` applied to its weights."""
    copy = ctx.build_model()
    load_state(copy, apply_transforms(model.state_dict(), ctx.spec, transforms))
    return copy


def run_aligner(methods: Methods, models: list[nn.Module], ctx: MergeContext) -> Alignment:
    """The aligner's alignment of `models`. An aligner that does not say it aligns attention heads (`aligns_heads`)
    sees a spec without them (moving units across heads, or by dense maps, would change what attention computes);
    where it then carried a model by permutations into model 0's basis, that model's heads are placed by weight
    matching's cost against model 0 (`heads_by_weights`), else they stay as they are (`heads_left`)."""
    factory = methods.align.factory
    heads = ctx.spec.head_groups()
    if not heads or getattr(factory, "aligns_heads", False):
        return factory(methods.align.params, models, ctx)
    result = factory(methods.align.params, models, dataclasses.replace(ctx, spec=ctx.spec.without(heads)))
    placed = 0
    if getattr(factory, "keeps_first", False):
        ref = parameters(models[0])
        for k, transforms in enumerate(result.transforms[1:], start=1):
            if all(t.is_permutation for t in transforms.values()):
                perms = {g: t.perm for g, t in transforms.items()}
                found = place_by_weights(ctx.spec, ref, parameters(models[k]), perms, heads)
                transforms.update({g: Transform.permutation(p) for g, p in found.items()})
                placed += 1
    result.diagnostics["heads_by_weights" if placed else "heads_left"] = len(heads)
    return result


def align_all(
    models: list[nn.Module], methods: Methods, ctx: MergeContext
) -> tuple[list[nn.Module], dict, Assemble | None]:
    """Bring `models` into one basis for aggregation (model 0's, or a joint aligner's shared one). Returns the
    models in that basis, the aligner's diagnostics (`align_<key>`, `align<k>_<key>` for pair k of K > 2 models),
    and the joint aligner's final assembly step (partial zipping), if any."""
    start = time.perf_counter()
    result = run_aligner(methods, models, ctx)
    aligned = [m if not t and k == 0 else carry(m, t, ctx) for k, (m, t) in enumerate(zip(models, result.transforms))]
    diagnostics = {f"align{key}" if key[:1].isdigit() else f"align_{key}": v for key, v in result.diagnostics.items()}
    diagnostics["align_s"] = time.perf_counter() - start
    return aligned, diagnostics, result.assemble


def align_to(
    ref: nn.Module, others: list[nn.Module], methods: Methods, ctx: MergeContext
) -> tuple[list[nn.Module], dict]:
    """Align every model in `others` to `ref`; returns [ref, *aligned] (with an aligner that moves model 0 too: all
    of them carried into its shared basis, as the interpolation curve needs them) and the aligner's diagnostics."""
    aligned, diagnostics, _ = align_all([ref, *others], methods, ctx)
    return aligned, diagnostics


def aggregate_and_repair(models: list[nn.Module], methods: Methods, ctx: MergeContext) -> Merged:
    start = time.perf_counter()
    merged = methods.agg.factory(methods.agg.params, models, ctx)
    merged.diagnostics["agg_s"] = time.perf_counter() - start
    start = time.perf_counter()
    merged.model = methods.repair.factory(methods.repair.params, merged.model, models, merged.weights, ctx)
    merged.diagnostics["repair_s"] = time.perf_counter() - start
    return merged


@STRATEGIES.register("all_to_one", StrategyParams)
def all_to_one(params: StrategyParams, models: list[nn.Module], methods: Methods, ctx: MergeContext) -> Merged:
    """Align every model to model 0 (or all jointly), then aggregate all at once (NP Fig. 1 baselines); partial
    zipping's trunk and heads are assembled from the repaired merge."""
    aligned, diagnostics, assemble = align_all(models, methods, ctx)
    merged = aggregate_and_repair(aligned, methods, ctx)
    if assemble is not None:
        merged.model = assemble(merged.model, aligned).eval()
    merged.diagnostics = {**diagnostics, **merged.diagnostics}
    merged.aligned_to_first = aligned
    return merged


@STRATEGIES.register("pairwise", StrategyParams)
def pairwise(params: StrategyParams, models: list[nn.Module], methods: Methods, ctx: MergeContext) -> Merged:
    """NP §III-C: each level pairs the remaining models in a seeded random order; each pair is aligned (second to
    first), aggregated and repaired; an odd model out waits for the next level. K models take K − 1 merges."""
    gen = torch.Generator().manual_seed(ctx.seed if params.order_seed is None else params.order_seed)
    pool = list(models)
    labels = [str(k) for k in range(len(models))]
    diagnostics: dict[str, Any] = {}
    artifacts = {}
    merges = 0
    while len(pool) > 1:
        order = torch.randperm(len(pool), generator=gen).tolist()
        next_pool, next_labels = [], []
        for i, j in zip(order[0::2], order[1::2]):
            merges += 1
            aligned, align_diag, assemble = align_all([pool[i], pool[j]], methods, ctx)
            if assemble is not None:
                raise ConfigError(
                    f"align={methods.align.name}: partial zipping leaves one head per model, which strategy=pairwise "
                    "cannot merge again: use strategy=all_to_one"
                )
            merged = aggregate_and_repair(aligned, methods, ctx)
            label = f"({labels[i]}+{labels[j]})"
            diagnostics.update({f"merge{merges}_{k}": v for k, v in {**align_diag, **merged.diagnostics}.items()})
            diagnostics[f"merge{merges}_pair"] = label
            artifacts.update({f"merge{merges}_{name}": t for name, t in merged.artifacts.items()})
            next_pool.append(merged.model)
            next_labels.append(label)
        if len(order) % 2:
            next_pool.append(pool[order[-1]])
            next_labels.append(labels[order[-1]])
        pool, labels = next_pool, next_labels
    diagnostics.update({"merges": merges, "merge_tree": labels[0]})
    return Merged(pool[0], uniform_weights(len(models)), diagnostics, artifacts)


def is_identity(transforms: dict[str, Transform]) -> bool:
    return all(
        t.perm is not None and torch.equal(t.perm.cpu(), torch.arange(t.perm.numel())) for t in transforms.values()
    )


@STRATEGIES.register("merge_many", StrategyParams)
def merge_many(params: StrategyParams, models: list[nn.Module], methods: Methods, ctx: MergeContext) -> Merged:
    """Git Re-Basin's MergeMany: in a seeded order, align each model to the average of the others; repeat for up to
    `rounds` rounds (stopping after a round where no permutation moved), then aggregate all and repair.

    An aligner that moves model 0 too (ZipIt!) has no fixed reference to align to; it already aligns all K models at
    once, as all_to_one runs it."""
    if not getattr(methods.align.factory, "keeps_first", False):
        return all_to_one(params, models, methods, ctx)
    gen = torch.Generator().manual_seed(ctx.seed if params.order_seed is None else params.order_seed)
    current = list(models)
    diagnostics: dict[str, Any] = {}
    start = time.perf_counter()
    rounds_run = 0
    for _ in range(params.rounds):
        rounds_run += 1
        moved = False
        for i in torch.randperm(len(current), generator=gen).tolist():
            ref = mean_model([m.state_dict() for m in current[:i] + current[i + 1 :]], ctx)
            result = run_aligner(methods, [ref, current[i]], ctx)
            current[i] = carry(current[i], result.transforms[1], ctx)
            moved = moved or not is_identity(result.transforms[1])
            diagnostics.update({f"align{i}_{k}": v for k, v in result.diagnostics.items()})
        if not moved:
            break
    diagnostics.update({"align_s": time.perf_counter() - start, "rounds": rounds_run})
    merged = aggregate_and_repair(current, methods, ctx)
    merged.diagnostics = {**diagnostics, **merged.diagnostics}
    return merged
