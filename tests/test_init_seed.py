"""train.init_seed: every base model initialised and shuffled with one seed (YM's code trains A and B with seed 0)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mergebench.cache import ModelCache
from mergebench.config import TrainConfig
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.train import BaseModelRequest, train_or_load

INFO = DatasetInfo("blobs", 3, 1, 4, (0.5,), (0.25,), False)
RECIPE = TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=1e-2, weight_decay=0.0, schedule="constant")


def blobs(n: int = 96) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = (y.view(-1, 1, 1, 1) * 80 + torch.randint(0, 60, (n, 1, 4, 4), generator=gen)).to(torch.uint8)
    return ImageData(x, y)


def build() -> torch.nn.Module:
    entry, params = MODELS.parse({"name": "mlp", "hidden": [16, 16], "norm": "none"})
    return entry.factory(params, ModelInput(1, 4, 3))


def request(run_seed: int, recipe: TrainConfig = RECIPE) -> BaseModelRequest:
    _, params = MODELS.parse({"name": "mlp", "hidden": [16, 16], "norm": "none"})
    return BaseModelRequest("base", blobs(), torch.arange(96), INFO, "mlp", params, recipe, False, run_seed)


def test_init_seed_overrides_the_per_model_seed(tmp_path: Path) -> None:
    shared = dataclasses.replace(RECIPE, init_seed=0)
    # model 0 (seed 0) and model 1 (seed 0 + 1) of a run: different unless init_seed is set
    a, _ = train_or_load(request(0), build, ModelCache(tmp_path / "a"))
    b, _ = train_or_load(request(1), build, ModelCache(tmp_path / "b"))
    b_shared, meta = train_or_load(request(1, shared), build, ModelCache(tmp_path / "c"))
    assert not meta["cache_hit"]
    assert not all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all(torch.equal(v, b_shared.state_dict()[k]) for k, v in a.state_dict().items())


def test_init_seed_enters_the_cache_key_as_the_seed_used() -> None:
    # null keeps the keys the cache held before the option existed; a set seed is the seed the model is keyed by
    assert request(1, dataclasses.replace(RECIPE, init_seed=0)).key() == request(0).key()
    assert request(1, dataclasses.replace(RECIPE, init_seed=1)).key() == request(1).key()
    assert request(1, dataclasses.replace(RECIPE, init_seed=0)).key() != request(1).key()


def test_init_seed_is_checked() -> None:
    assert to_dataclass(TrainConfig, {"init_seed": 3}, "train").init_seed == 3
    with pytest.raises(Exception, match="init_seed"):
        to_dataclass(TrainConfig, {"init_seed": -1}, "train")
