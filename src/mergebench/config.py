"""The run's configuration schema: Hydra composes the YAML, this module checks and types it.

Every section with a `name` is looked up in its registry and checked against that component's own params
dataclass, so a new component brings its own schema. Errors are one-line ConfigErrors naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mergebench.align import ALIGNERS
from mergebench.data.datasets import DATASETS
from mergebench.data.merge_data import MergeDataConfig
from mergebench.data.splits import SPLITS
from mergebench.errors import ConfigError
from mergebench.merge import AGGREGATORS, REPAIRS, STRATEGIES
from mergebench.merge.strategies import check_combination
from mergebench.models import MODELS
from mergebench.registry import Registry, to_dataclass


@dataclasses.dataclass(frozen=True)
class Component:
    """A registry entry chosen by config, with its validated parameters."""

    name: str
    factory: Any
    params: Any


@dataclasses.dataclass
class DataConfig:
    split: str = "same"
    num_models: int = 2
    split_seed: int = 0
    root: str = "./data"
    download: bool = False
    train_limit: int | None = None
    test_limit: int | None = None

    def check(self) -> None:
        if self.num_models < 2:
            raise ConfigError(f"num_models={self.num_models} must be >= 2 (merging needs at least two models)")
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}={value} must be a positive integer or null (all)")


@dataclasses.dataclass
class DatasetConfig:
    name: str = "digits"
    augment: bool | None = None


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 500
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0
    schedule: str = "warmup_linear"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    only: bool = False

    def check(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be >= 0")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be > 0")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer={self.optimizer!r} is not known; allowed: adam, sgd")
        if self.schedule not in ("warmup_linear", "constant"):
            raise ConfigError(f"schedule={self.schedule!r} is not known; allowed: constant, warmup_linear")


@dataclasses.dataclass
class ReferencesConfig:
    ensemble: bool = True
    joint: bool = False


@dataclasses.dataclass
class EvalConfig:
    batch_size: int = 1000


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
    split: Component
    model: Component
    train: TrainConfig
    align: Component
    agg: Component
    repair: Component
    strategy: Component
    merge_data: MergeDataConfig
    references: ReferencesConfig
    eval: EvalConfig
    curve: CurveConfig
    raw: dict[str, Any]


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
    "merge",
    "merge_data",
    "references",
    "eval",
    "curve",
}


def _component(registry: Registry, section: Any, prefix: str) -> Component:
    entry, params = registry.parse(section, prefix)
    return Component(entry.name, entry.factory, params)


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a mapping")
    return dict(value)


# batch_size: small batches give the one smoke epoch ~10 steps, enough to lift the models above chance
SMOKE_LIMITS = {
    "train_limit": 1000, "test_limit": 500, "epochs": 1, "batch_size": 100, "width": 0.25, "hidden": 64, "curve": 3,
}  # fmt: skip


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
    model = raw.setdefault("model", {})
    if "width" in model:
        model["width"] = min(float(model["width"]), SMOKE_LIMITS["width"])
    if "hidden" in model:
        model["hidden"] = [min(h, SMOKE_LIMITS["hidden"]) for h in model["hidden"]]
    if "gamma_grid" in raw.get("align", {}):  # CCA's γ search: every fourth value of the grid (1e-6, 1e-2, …)
        raw["align"]["gamma_grid"] = raw["align"]["gamma_grid"][::4]
    curve = raw.setdefault("curve", {})
    if curve.get("points", 0) > SMOKE_LIMITS["curve"]:
        curve["points"] = SMOKE_LIMITS["curve"]
    return raw


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
            raise ConfigError(f"{key} is not a known key; allowed: {', '.join(sorted(TOP_LEVEL))}")

    data_raw = _section(raw, "data")
    dataset_raw = data_raw.pop("dataset", {"name": "digits"})
    common_keys = {f.name for f in dataclasses.fields(DataConfig)}
    split_params = {k: v for k, v in data_raw.items() if k not in common_keys}
    data = to_dataclass(DataConfig, {k: v for k, v in data_raw.items() if k in common_keys}, "data")
    split = _component(SPLITS, {"name": data.split, **split_params}, "data")
    dataset = to_dataclass(DatasetConfig, dataset_raw, "data.dataset")
    DATASETS.get(dataset.name)

    merge_raw = _section(raw, "merge")
    strategy = _component(STRATEGIES, {"name": merge_raw.pop("strategy", "all_to_one"), **merge_raw}, "merge")
    select_on = str(raw.get("select_on", "val"))
    if select_on not in ("val", "test"):
        raise ConfigError(f"select_on={select_on!r} is not known; allowed: test, val")
    device = str(raw.get("device", "auto"))
    if device != "auto" and not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ConfigError(f"device={device!r} is not known; allowed: auto, cpu, cuda, cuda:N, mps")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    agg = _component(AGGREGATORS, _section(raw, "agg"), "agg")
    check_combination(strategy.name, data.num_models, agg.name, agg.params)
    curve = to_dataclass(CurveConfig, _section(raw, "curve"), "curve")
    if curve.points and data.num_models != 2:
        raise ConfigError(
            f"curve.points={curve.points} needs data.num_models=2, not {data.num_models}: "
            "the curve interpolates model A and the aligned model B (curve.points=0 turns it off)"
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
        model=_component(MODELS, _section(raw, "model"), "model"),
        train=to_dataclass(TrainConfig, _section(raw, "train"), "train"),
        align=_component(ALIGNERS, _section(raw, "align"), "align"),
        agg=agg,
        repair=_component(REPAIRS, _section(raw, "repair"), "repair"),
        strategy=strategy,
        merge_data=to_dataclass(MergeDataConfig, _section(raw, "merge_data"), "merge_data"),
        references=to_dataclass(ReferencesConfig, _section(raw, "references"), "references"),
        eval=to_dataclass(EvalConfig, _section(raw, "eval"), "eval"),
        curve=curve,
        raw=raw,
    )
