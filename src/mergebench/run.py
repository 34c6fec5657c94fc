"""One run, top to bottom: scenario -> base models -> references -> align/aggregate/repair -> evaluate -> CSV,
and, with `curve.points=N`, the interpolation curve of model A and the aligned model B with its barriers."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mergebench.cache import (
    ResultsCache,
    atomic_write_bytes,
    atomic_write_text,
    code_digest,
    content_key,
    tensor_digest,
)
from mergebench.config import RunConfig
from mergebench.context import MergeContext
from mergebench.data.adapt import adapt_inputs
from mergebench.data.datasets import DatasetInfo, ImageData, load_dataset, with_normalize
from mergebench.data.loader import Batches
from mergebench.data.merge_data import MergeData, select_merge_data
from mergebench.data.splits import Scenario, SplitRequest
from mergebench.errors import ConfigError
from mergebench.merging.curve import CURVE_AGG, barriers, interpolation_curve
from mergebench.merging.registry import Merged
from mergebench.merging.strategies import Methods, align_to
from mergebench.pause import pause_point
from mergebench.progress import announce
from mergebench.references import REFERENCES, BaseModels, RunModels, base_models
from mergebench.results import RowWriter, label_suffix, method_label, model_columns
from mergebench.spec.verify import VERIFY_BATCH, checked_spec


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _limit(data: ImageData, limit: int | None, seed: int) -> ImageData:
    if limit is None or limit >= len(data):
        return data
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return ImageData(data.x[keep].contiguous(), data.y[keep])


Loaded = dict[str, tuple[DatasetInfo, ImageData, ImageData]]


def build_scenario(cfg: RunConfig, loaded: Loaded | None = None) -> Scenario:
    """The run's clients, test set and subsets; `loaded` shares read datasets between calls (the CLI's check of
    every job of a sweep). A client left without examples is refused here, before anything trains."""
    loaded = {} if loaded is None else loaded

    def load(name: str) -> tuple[DatasetInfo, ImageData, ImageData]:
        key = f"{name}|{cfg.data.root}|{cfg.data.train_limit}|{cfg.data.test_limit}|{cfg.data.split_seed}"
        key += f"|{cfg.dataset.normalize}|{cfg.dataset.channels}|{cfg.dataset.size}"
        if key not in loaded:
            info, train, test = load_dataset(name, cfg.data.root, cfg.data.download, cfg.cache_dir / "data")
            info = with_normalize(info, cfg.dataset.normalize)  # dataset.normalize: in the inputs and the cache key
            info, train, test = adapt_inputs(info, train, test, cfg.dataset.channels, cfg.dataset.size)
            train = _limit(train, cfg.data.train_limit, cfg.data.split_seed)
            loaded[key] = info, train, _limit(test, cfg.data.test_limit, 0)
        return loaded[key]

    request = SplitRequest(cfg.dataset.name, load, cfg.data.num_models, cfg.data.split_seed)
    scenario = cfg.split.factory(cfg.split.params, request)
    empty = [k for k, idx in enumerate(scenario.clients) if idx.numel() == 0]
    if empty:
        shown = ", ".join(map(str, empty[:8])) + (f" and {len(empty) - 8} more" if len(empty) > 8 else "")
        raise ConfigError(
            f"data.num_models={cfg.data.num_models}: client(s) {shown} get no training examples from "
            f"{scenario_label(cfg)} on {len(scenario.train)} {scenario.info.name} examples "
            f"({scenario.info.num_classes} classes); use fewer models"
        )
    return scenario


def scenario_digest(scenario: Scenario) -> str:
    """The content of everything the run reads: a changed data file changes it, whatever its path."""
    parts = [scenario.train.x, scenario.train.y, scenario.test.x, scenario.test.y, *scenario.clients]
    return tensor_digest(*parts, *scenario.test_subsets.values())


def save_split(scenario: Scenario, out_dir: Path) -> None:
    atomic_write_text(out_dir / "split_manifest.json", json.dumps(scenario.manifest(), indent=1))
    arrays = {f"client_{k}": idx.numpy() for k, idx in enumerate(scenario.clients)}
    arrays.update({f"test_{name}": idx.numpy() for name, idx in scenario.test_subsets.items()})
    atomic_write_bytes(out_dir / "split_indices.npz", lambda f: np.savez_compressed(f, **arrays))


def split_params(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg.split.params) if cfg.split.params is not None else {}


def scenario_label(cfg: RunConfig) -> str:
    """The split with its parameters, e.g. `rotated(angle=90.0)`, for people; programs read `split_params`."""
    inner = ",".join(f"{k}={v}" for k, v in split_params(cfg).items())
    return f"{cfg.split.name}({inner})"


def common_columns(cfg: RunConfig, scenario: Scenario) -> dict:
    per_class = cfg.merge_data.per_class
    return {
        "run_id": content_key(cfg.raw),
        "experiment": cfg.name,
        "dataset": scenario.info.name,
        "split": cfg.split.name,
        "scenario": scenario_label(cfg),
        "split_params": json.dumps(split_params(cfg)),
        "arch": cfg.model.name,
        **model_columns(cfg.model.params),
        "num_models": cfg.data.num_models,
        "seed": cfg.seed,
        "align": cfg.align.name,
        "agg": cfg.agg.name,
        "repair": cfg.repair.name,
        "strategy": cfg.strategy.name,
        "merge_data": cfg.merge_data.source + ("" if per_class is None else f"/{per_class}pc"),
        "select_on": cfg.select_on,
    }


def run(cfg: RunConfig, out_dir: Path, loaded: Loaded | None = None) -> pd.DataFrame:
    """Run, unless a run with the same resolved config on the same data finished before: then its files are
    restored (repeated commands and resumed sweeps train and merge nothing). `loaded`: datasets already read in
    this process (the CLI's check read them), by `build_scenario`'s key."""
    pause_point("run_start")
    scenario = build_scenario(cfg, loaded)
    finished = ResultsCache(cfg.cache_dir)
    key = content_key({"config": cfg.raw, "data": scenario_digest(scenario), "code": code_digest()})
    if finished.restore(key, out_dir) is not None:
        announce(f"cache hit: run finished before: reusing its rows (results {key})")
        return pd.read_csv(out_dir / "results.csv")
    df = merge_and_evaluate(cfg, scenario, out_dir)
    finished.store(key, out_dir, len(df))
    return df


def check_model_input(build: Callable[[], torch.nn.Module], test: ImageData, info: DatasetInfo) -> None:
    """Two test images through the architecture built on the meta device (shapes only, nothing initialised),
    before anything trains or loads: a model built for other inputs (a zoo net on the 1×8×8 digits) stops here with
    one line naming the keys that adapt the images, not with a traceback from inside its forward."""
    x, _ = next(iter(Batches(test, torch.arange(min(2, len(test))), info, 2)))
    try:
        with torch.device("meta"):
            logits = build().eval()(x.to("meta"))
    except NotImplementedError:
        return  # an op without a meta kernel: the first real forward is the check
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"the model does not take {info.name}'s inputs [N, {info.channels}, {info.size}, {info.size}] ({first}); "
            "adapt the images with data.dataset.channels=<its input channels> and/or data.dataset.size=<pixels>, "
            "or build it for them (model.kwargs)"
        ) from None
    if isinstance(logits, torch.Tensor) and logits.shape[-1] != info.num_classes:
        raise ConfigError(
            f"the model outputs {logits.shape[-1]} logits but {info.name} has {info.num_classes} classes; build it "
            f"with {info.num_classes} outputs (e.g. model.kwargs={{num_classes:{info.num_classes}}})"
        )


def merge_and_evaluate(cfg: RunConfig, scenario: Scenario, out_dir: Path) -> pd.DataFrame:
    """The pipeline of one run, top to bottom: base models, references, merge, curve, rows."""
    save_split(scenario, out_dir)
    setup = RunModels.on(cfg, scenario, resolve_device(cfg.device))
    check_model_input(lambda: cfg.model.factory(cfg.model.params, setup.model_input()), setup.test, setup.info)
    writer = RowWriter(common_columns(cfg, scenario))
    bases = base_models(setup, writer)
    merge = select_merge_data(scenario, cfg.merge_data)
    for name, add in REFERENCES.items():
        if getattr(cfg.references, name):
            add(setup, bases, merge, writer)
    if not cfg.train.only:
        merged, ctx = merge_models(setup, bases, merge, writer, out_dir)
        if cfg.curve.points:
            write_curve(setup, bases, merged, ctx, writer)
    return writer.write(out_dir)


def merge_models(
    setup: RunModels, bases: BaseModels, merge: MergeData, writer: RowWriter, out_dir: Path
) -> tuple[Merged, MergeContext]:
    """The spec checked on the base models, then the strategy's merge (aligner, aggregator, repair), its row and
    artifacts."""
    cfg = setup.cfg
    sample = next(iter(Batches(setup.train, merge.fit, setup.info, VERIFY_BATCH)))[0]
    methods = Methods(cfg.align, cfg.agg, cfg.repair)
    spec, checked = checked_spec(bases.modules, sample, setup.info.num_classes, seed=cfg.seed, check=methods.check_spec)
    ctx = MergeContext(
        spec=spec,
        build_model=setup.build,
        train=setup.train,
        test=setup.test,
        info=setup.info,
        merge=merge,
        batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.eval.batch_size,
        device=setup.device,
        seed=cfg.seed,
        select_on=cfg.select_on,
    )
    pause_point("merge")
    start = time.perf_counter()
    merged = cfg.strategy.factory(cfg.strategy.params, bases.modules, methods, ctx)
    wall = time.perf_counter() - start
    merged.save_artifacts(out_dir)
    label = method_label(cfg.align.name, cfg.agg.name, cfg.repair.name)
    label += label_suffix(cfg.align.params, cfg.agg.params, cfg.repair.params, cfg.strategy.params)
    writer.add(
        label, "merged", setup.evaluate(merged.model)[1], wall_s=wall, diagnostics={**checked, **merged.diagnostics}
    )
    return merged, ctx


def write_curve(setup: RunModels, bases: BaseModels, merged: Merged, ctx: MergeContext, writer: RowWriter) -> None:
    """The interpolation curve of model A and the aligned model B (α = A's weight; two models, checked with the
    config), each point repaired, and its barriers."""
    cfg = setup.cfg
    methods = Methods(cfg.align, cfg.agg, cfg.repair)
    # reuse the strategy's alignment where A stayed the reference (all_to_one); else align B to A here
    model_a, model_b = merged.aligned_to_first or align_to(bases.modules[0], [bases.modules[1]], methods, ctx)[0]
    label = method_label(cfg.align.name, CURVE_AGG, cfg.repair.name)
    points = []
    for alpha, model in interpolation_curve(model_a, model_b, cfg.curve.points, cfg.repair, ctx):
        points.append((alpha, setup.evaluate(model)[1]))
        writer.add(label, "curve", points[-1][1], alpha=alpha)
    writer.add(label, "barrier", barriers(points))
