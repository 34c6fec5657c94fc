"""The run's configuration schema: Hydra composes the YAML, this module checks and types it.

Every section with a `name` is looked up in its registry and checked against that component's own params
dataclass, so a new component brings its own schema. Errors are one-line ConfigErrors naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from mergebench.align import ALIGNERS, Aligner
from mergebench.checkpoints import check_sources, checkpoint_key, checkpoint_paths
from mergebench.data.datasets import DATASETS, NORMALIZE_MODES
from mergebench.data.merge_data import MergeDataConfig
from mergebench.data.splits import SPLITS, Split
from mergebench.errors import ConfigError, suggest
from mergebench.merging import AGGREGATORS, REPAIRS, STRATEGIES, Aggregator, Repair, Strategy
from mergebench.merging.strategies import check_combination
from mergebench.models import MODELS, ModelBuilder
from mergebench.registry import Component, Registry, to_dataclass

T = TypeVar("T")


@dataclasses.dataclass
class DataConfig:
    """The keys every split shares; the split itself is chosen by `data.name`, and its own keys sit beside these."""

    num_models: int = 2
    split_seed: int = 0
    root: str = "./data"
    download: bool = False
    train_limit: int | None = None
    test_limit: int | None = None

    def check(self) -> None:
        if self.num_models < 2:
            raise ConfigError(f"num_models={self.num_models} must be >= 2 (merging needs at least two models)")
        if self.split_seed < 0:
            raise ConfigError(f"split_seed={self.split_seed} must be >= 0")
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}={value} must be a positive integer or null (all)")


@dataclasses.dataclass
class DatasetConfig:
    name: str = "digits"
    augment: bool | None = None
    normalize: str = "standard"  # standard = (x/255 - mean)/std | unit = x/255 (Git Re-Basin, YM)
    channels: int | None = None  # images adapted to this many channels (gray repeated), for zoo models
    size: int | None = None  # images resized to size × size (bilinear), for zoo models

    def check(self) -> None:
        for key in ("channels", "size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"dataset.{key}={value!r} must be a positive integer or null (the dataset's own)")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"normalize={self.normalize!r} is not known; {suggest(self.normalize, NORMALIZE_MODES)}")


SCHEDULES = ("constant", "warmup_linear", "warmup_cosine")
OPTIMIZERS = ("adam", "sgd")
SELECT_ON = ("test", "val")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 500
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0
    # cap on the warm-up as a fraction of the run (the papers warm up 5 of 200 epochs = 0.025), so that a short run
    # is not all warm-up; null = no cap
    warmup_max_fraction: float | None = None
    schedule: str = "warmup_linear"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    only: bool = False
    # null: model k is initialised (and its batches shuffled) with seed + k (DESIGN §6); an integer: every base
    # model uses this seed, as YM's code does (its A and B train configs both set seed 0): ++train.init_seed='${seed}'
    init_seed: int | None = None

    def check(self) -> None:
        if self.init_seed is not None and self.init_seed < 0:
            raise ConfigError(f"init_seed={self.init_seed} must be >= 0 or null")
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be >= 0")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be > 0")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not known; {suggest(self.optimizer, OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not known; {suggest(self.schedule, SCHEDULES)}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.warmup_max_fraction is not None and not 0 <= self.warmup_max_fraction <= 1:
            raise ConfigError(f"warmup_max_fraction={self.warmup_max_fraction} must lie in [0, 1] or be null")


CORESET_REPORTS = ("last", "best_test_epoch")


@dataclasses.dataclass
class ReferencesConfig:
    ensemble: bool = True
    joint: bool = False
    coreset: bool = False  # a model trained from scratch on the merge data, when it is a coreset (YM "Coreset AB")
    # the Coreset model's own recipe where it differs from the base models' (YM trains it 200 epochs at lr 0.05);
    # null = the base recipe's value. Base models keep their recipe, so their cache entries stay shared.
    coreset_epochs: int | None = None
    coreset_lr: float | None = None
    # last: the model after its last epoch; best_test_epoch: the best test top-1 over its epochs, the number YM's
    # code reports for Coreset AB (test_acc_best_data_cond) — selected on the test set, so for reproduction only
    coreset_report: str = "last"

    def check(self) -> None:
        if self.coreset_report not in CORESET_REPORTS:
            raise ConfigError(
                f"coreset_report={self.coreset_report!r} is not known; {suggest(self.coreset_report, CORESET_REPORTS)}"
            )
        if self.coreset_epochs is not None and self.coreset_epochs < 0:
            raise ConfigError(f"coreset_epochs={self.coreset_epochs} must be >= 0 or null (the base recipe's)")
        if self.coreset_lr is not None and not self.coreset_lr > 0:
            raise ConfigError(f"coreset_lr={self.coreset_lr} must be > 0 or null (the base recipe's)")

    def coreset_recipe(self, base: TrainConfig) -> TrainConfig:
        """The base recipe with the Coreset model's overrides."""
        changes = {"epochs": self.coreset_epochs, "lr": self.coreset_lr}
        return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


@dataclasses.dataclass
class EvalConfig:
    batch_size: int = 1000

    def check(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be > 0")


@dataclasses.dataclass
class CurveConfig:
    points: int = 0

    def check(self) -> None:
        if self.points == 1 or self.points < 0:
            raise ConfigError(f"points={self.points} must be 0 (off) or >= 2")


@dataclasses.dataclass
class RunConfig:
    name: str
    seed: int
    device: str
    cache_dir: Path
    select_on: str
    data: DataConfig
    dataset: DatasetConfig
    split: Component[Split]
    model: Component[ModelBuilder]
    train: TrainConfig
    align: Component[Aligner]
    agg: Component[Aggregator]
    repair: Component[Repair]
    strategy: Component[Strategy]
    merge_data: MergeDataConfig
    references: ReferencesConfig
    eval: EvalConfig
    curve: CurveConfig
    raw: dict[str, Any]
    checkpoints: list[Path] = dataclasses.field(default_factory=list)  # user weights instead of trained bases


TOP_LEVEL = {
    "name",
    "seed",
    "device",
    "cache_dir",
    "select_on",
    "smoke",
    "data",
    "model",
    "train",
    "align",
    "agg",
    "repair",
    "strategy",
    "merge_data",
    "references",
    "eval",
    "curve",
    "checkpoints",
}


def _component(registry: Registry[T], section: Any, prefix: str) -> Component[T]:
    entry, params = registry.parse(section, prefix)
    return Component(entry.name, entry.factory, params)


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a mapping")
    return dict(value)


# the sections chosen by `name` from a registry, whose params dataclass may declare `smoke(values) -> values`
PLUGIN_SECTIONS: dict[str, Registry] = {
    "model": MODELS,
    "align": ALIGNERS,
    "agg": AGGREGATORS,
    "repair": REPAIRS,
    "strategy": STRATEGIES,
}

# batch_size: small batches give the one smoke epoch ~10 steps, enough to lift the models above chance
SMOKE_LIMITS = {"train_limit": 1000, "test_limit": 500, "epochs": 1, "batch_size": 100, "curve": 3}


def apply_smoke(raw: dict[str, Any]) -> dict[str, Any]:
    """`smoke=true` shrinks any preset (data, epochs, widths) so it runs on a CPU in seconds; same code paths."""
    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    for key in ("train_limit", "test_limit"):
        data[key] = min(data.get(key) or SMOKE_LIMITS[key], SMOKE_LIMITS[key])
    raw.setdefault("train", {})["epochs"] = min(raw["train"].get("epochs", 1), SMOKE_LIMITS["epochs"])
    raw["train"]["batch_size"] = min(raw["train"].get("batch_size", 500), SMOKE_LIMITS["batch_size"])
    for section in ("align", "agg"):
        if "epochs" in raw.get(section, {}):
            raw[section]["epochs"] = min(raw[section]["epochs"], SMOKE_LIMITS["epochs"])
    references = raw.get("references", {})
    if references.get("coreset_epochs") is not None:
        references["coreset_epochs"] = min(references["coreset_epochs"], SMOKE_LIMITS["epochs"])
    for section, registry in PLUGIN_SECTIONS.items():  # a component shrinks its own parameters (widths, CCA's γ grid)
        values = raw.get(section)
        if isinstance(values, dict) and "name" in values:
            smoke = getattr(registry.get(str(values["name"])).params, "smoke", None)
            if smoke is not None:
                raw[section] = smoke(values)
    curve = raw.setdefault("curve", {})
    if curve.get("points", 0) > SMOKE_LIMITS["curve"]:
        curve["points"] = SMOKE_LIMITS["curve"]
    return raw


def check_run(chosen: dict[str, Component]) -> None:
    """The checks across sections that components state themselves (`check_run` on their params, e.g. a strategy
    that does its own matching refuses an aligner beside it), so the core names none of them."""
    for component in chosen.values():
        hook = getattr(component.params, "check_run", None)
        if hook is not None:
            hook(chosen)


def validate(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Check a composed config and return it typed; raises a one-line ConfigError on the first bad key."""
    raw: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    smoke = raw.pop("smoke", False)
    if not isinstance(smoke, bool):
        raise ConfigError(f"smoke={smoke!r} must be true or false")
    if smoke:
        raw = apply_smoke(raw)
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{key} is not a known key; {suggest(key, sorted(TOP_LEVEL))}")
    checkpoints = checkpoint_paths(raw.get("checkpoints"))
    if checkpoints:  # one model per file; the results cache keys on the files' content, not only their paths
        raw["data"] = {**_section(raw, "data"), "num_models": len(checkpoints)}
        raw["checkpoints"] = checkpoint_key(checkpoints)

    data_raw = _section(raw, "data")
    dataset_raw = data_raw.pop("dataset", {"name": "digits"})
    common_keys = {f.name for f in dataclasses.fields(DataConfig)}
    split_params = {k: v for k, v in data_raw.items() if k not in common_keys}
    data = to_dataclass(DataConfig, {k: v for k, v in data_raw.items() if k in common_keys}, "data")
    split = _component(SPLITS, {"name": "same", **split_params}, "data")
    dataset = to_dataclass(DatasetConfig, dataset_raw, "data.dataset")
    DATASETS.get(dataset.name)

    strategy = _component(STRATEGIES, {"name": "all_to_one", **_section(raw, "strategy")}, "strategy")
    select_on = str(raw.get("select_on", "val"))
    if select_on not in SELECT_ON:
        raise ConfigError(f"select_on={select_on!r} is not known; {suggest(select_on, SELECT_ON)}")
    device = str(raw.get("device", "auto"))
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"device={device!r} is not known; allowed: auto, cpu, cuda, cuda:N, mps")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")
    align = _component(ALIGNERS, _section(raw, "align"), "align")
    agg = _component(AGGREGATORS, _section(raw, "agg"), "agg")
    check_combination(strategy.name, data.num_models, agg.name, agg.params)
    merge_data = to_dataclass(MergeDataConfig, _section(raw, "merge_data"), "merge_data")
    if merge_data.source != "union" and int(merge_data.source) >= data.num_models:
        raise ConfigError(
            f"merge_data.source={merge_data.source} but data.num_models={data.num_models}: "
            f"allowed: union, 0..{data.num_models - 1}"
        )
    curve = to_dataclass(CurveConfig, _section(raw, "curve"), "curve")
    if curve.points and data.num_models != 2:
        raise ConfigError(
            f"curve.points={curve.points} needs data.num_models=2, not {data.num_models}: "
            "the curve interpolates model A and the aligned model B (curve.points=0 turns it off)"
        )
    model = _component(MODELS, _section(raw, "model"), "model")
    repair = _component(REPAIRS, _section(raw, "repair"), "repair")
    check_run({"data": split, "model": model, "align": align, "agg": agg, "repair": repair, "strategy": strategy})
    references = to_dataclass(ReferencesConfig, _section(raw, "references"), "references")
    check_sources(model.name, checkpoints, references.joint)
    if checkpoints and references.coreset:
        raise ConfigError(
            "references.coreset=true trains a model on the merge data; with checkpoints=[...] nothing is trained"
        )
    return RunConfig(
        name=str(raw.get("name", "adhoc")),
        seed=seed,
        device=device,
        cache_dir=Path(os.path.expanduser(str(raw.get("cache_dir", "outputs/cache")))).resolve(),
        select_on=select_on,
        data=data,
        dataset=dataset,
        split=split,
        model=model,
        train=to_dataclass(TrainConfig, _section(raw, "train"), "train"),
        align=align,
        agg=agg,
        repair=repair,
        strategy=strategy,
        merge_data=merge_data,
        references=references,
        eval=to_dataclass(EvalConfig, _section(raw, "eval"), "eval"),
        curve=curve,
        raw=raw,
        checkpoints=checkpoints,
    )
