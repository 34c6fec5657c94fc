"""One run, top to bottom: scenario -> base models -> references -> align/aggregate/repair -> evaluate -> CSV,
and, with `curve.points=N`, the interpolation curve of model A and the aligned model B with its barriers."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mergebench.cache import ModelCache, atomic_write_bytes, atomic_write_text, content_key
from mergebench.config import RunConfig
from mergebench.context import MergeContext
from mergebench.data.datasets import DatasetInfo, ImageData, load_dataset
from mergebench.data.loader import to_device
from mergebench.data.merge_data import select_merge_data
from mergebench.data.splits import Scenario, SplitRequest
from mergebench.evaluate import ensemble_logits, metrics, predict, subset_metrics
from mergebench.merge.curve import barriers, interpolation_curve
from mergebench.merge.strategies import Methods, align_to
from mergebench.models import ModelInput
from mergebench.results import RowWriter, base_label, method_label
from mergebench.train import BaseModelRequest, train_or_load


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _limit(data: ImageData, limit: int | None, seed: int) -> ImageData:
    if limit is None or limit >= len(data):
        return data
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return ImageData(data.x[keep].contiguous(), data.y[keep])


def build_scenario(cfg: RunConfig) -> Scenario:
    @functools.cache
    def load(name: str) -> tuple[DatasetInfo, ImageData, ImageData]:
        info, train, test = load_dataset(name, cfg.data.root, cfg.data.download, cfg.cache_dir / "data")
        return info, _limit(train, cfg.data.train_limit, cfg.data.split_seed), _limit(test, cfg.data.test_limit, 0)

    request = SplitRequest(cfg.dataset.name, load, cfg.data.num_models, cfg.data.split_seed)
    return cfg.split.factory(cfg.split.params, request)


def save_split(scenario: Scenario, out_dir: Path) -> None:
    atomic_write_text(out_dir / "split_manifest.json", json.dumps(scenario.manifest(), indent=1))
    arrays = {f"client_{k}": idx.numpy() for k, idx in enumerate(scenario.clients)}
    arrays.update({f"test_{name}": idx.numpy() for name, idx in scenario.test_subsets.items()})
    atomic_write_bytes(out_dir / "split_indices.npz", lambda f: np.savez_compressed(f, **arrays))


def scenario_label(cfg: RunConfig) -> str:
    """The split with its parameters, e.g. `rotated(angle=90.0)`: the report's columns are built from it."""
    params = dataclasses.asdict(cfg.split.params) if cfg.split.params is not None else {}
    inner = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{cfg.data.split}({inner})"


def common_columns(cfg: RunConfig, scenario: Scenario) -> dict:
    per_class = cfg.merge_data.per_class
    return {
        "run_id": content_key(cfg.raw),
        "experiment": cfg.name,
        "dataset": scenario.info.name,
        "split": cfg.data.split,
        "scenario": scenario_label(cfg),
        "arch": cfg.model.name,
        "width": getattr(cfg.model.params, "width", None),
        "norm": getattr(cfg.model.params, "norm", None),
        "num_models": cfg.data.num_models,
        "seed": cfg.seed,
        "align": cfg.align.name,
        "agg": cfg.agg.name,
        "repair": cfg.repair.name,
        "strategy": cfg.strategy.name,
        "merge_data": cfg.merge_data.source + ("" if per_class is None else f"/{per_class}pc"),
        "select_on": cfg.select_on,
    }


def run(cfg: RunConfig, out_dir: Path) -> pd.DataFrame:
    device = resolve_device(cfg.device)
    scenario = build_scenario(cfg)
    save_split(scenario, out_dir)
    info = scenario.info
    augment = info.augment if cfg.dataset.augment is None else cfg.dataset.augment
    train, test = to_device(scenario.train, device), to_device(scenario.test, device)
    model_input = ModelInput(info.channels, info.size, info.num_classes)

    def build() -> torch.nn.Module:
        return cfg.model.factory(cfg.model.params, model_input).to(device)

    cache = ModelCache(cfg.cache_dir)

    def base_model(label: str, indices: torch.Tensor, init_seed: int) -> tuple[torch.nn.Module, dict]:
        request = BaseModelRequest(
            label, train, indices, info, cfg.model.name, cfg.model.params, cfg.train, augment, init_seed
        )
        return train_or_load(request, build, cache)

    models = [base_model(f"base {k}", idx, cfg.seed + k) for k, idx in enumerate(scenario.clients)]

    writer = RowWriter(common_columns(cfg, scenario))
    test_all = torch.arange(len(test))

    def evaluate(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, dict[str, float]]]:
        logits = predict(model, test, test_all, info, cfg.eval.batch_size)
        return logits, subset_metrics(logits, test.y, scenario.test_subsets)

    base_logits, base_results = [], []
    for k, (model, meta) in enumerate(models):
        logits, results = evaluate(model)
        base_logits.append(logits)
        base_results.append(results)
        writer.add(base_label(k, len(models)), f"base_{k}", results, wall_s=meta.get("wall_s"))
    writer.add("Base models avg.", "base_avg", _mean_results(base_results))
    if cfg.references.ensemble:
        ens = ensemble_logits(base_logits)
        writer.add(
            "Ensemble", "ensemble", {s: metrics(ens[i], test.y.cpu()[i]) for s, i in scenario.test_subsets.items()}
        )
    if cfg.references.joint:
        joint, meta = base_model("joint", torch.unique(torch.cat(scenario.clients)), cfg.seed)
        writer.add("Joint", "joint", evaluate(joint)[1], wall_s=meta.get("wall_s"))

    if not cfg.train.only:
        ctx = MergeContext(
            spec=models[0][0].permutation_spec(),
            build_model=build,
            train=train,
            test=test,
            info=info,
            merge=select_merge_data(scenario, cfg.merge_data),
            batch_size=cfg.train.batch_size,
            eval_batch_size=cfg.eval.batch_size,
            device=device,
            seed=cfg.seed,
            select_on=cfg.select_on,
        )
        start = time.perf_counter()
        methods = Methods(cfg.align, cfg.agg, cfg.repair)
        merged = cfg.strategy.factory(cfg.strategy.params, [m for m, _ in models], methods, ctx)
        wall = time.perf_counter() - start
        merged.save_artifacts(out_dir)
        label = method_label(cfg.align.name, cfg.agg.name, cfg.repair.name)
        writer.add(label, "merged", evaluate(merged.model)[1], wall_s=wall, diagnostics=merged.diagnostics)

        if cfg.curve.points:  # two models (checked with the config): A and B aligned to it, α = A's weight
            # reuse the strategy's alignment where A stayed the reference (all_to_one); else align B to A here
            kept_a = len(merged.sources) == 2 and merged.sources[0] is models[0][0]
            model_a, model_b = merged.sources if kept_a else align_to(models[0][0], [models[1][0]], methods, ctx)[0]
            curve_label = method_label(cfg.align.name, "avg", cfg.repair.name)
            points = []
            for alpha, model in interpolation_curve(model_a, model_b, cfg.curve.points, cfg.repair, ctx):
                points.append((alpha, evaluate(model)[1]))
                writer.add(curve_label, "curve", points[-1][1], alpha=alpha)
            writer.add(curve_label, "barrier", barriers(points))
    return writer.write(out_dir)


def _mean_results(results: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        subset: {metric: float(np.mean([r[subset][metric] for r in results])) for metric in values}
        for subset, values in results[0].items()
    }
