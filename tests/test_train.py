"""Base training (schedule, CPU-safe AMP/channels_last, determinism), its cache, and the evaluation metrics."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from mergebench.cache import ModelCache
from mergebench.config import TrainConfig
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.evaluate import ensemble_logits, metrics, predict, subset_metrics
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.train import BaseModelRequest, autocast, lr_factor, train_model, train_or_load

INFO = DatasetInfo("blobs", 3, 1, 4, (0.5,), (0.25,), False)
RECIPE = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=1e-2, weight_decay=0.0, schedule="constant")


def blobs(n: int = 192) -> ImageData:
    """Three classes that differ in brightness: learnable in a few steps."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = (y.view(-1, 1, 1, 1) * 80 + torch.randint(0, 60, (n, 1, 4, 4), generator=gen)).to(torch.uint8)
    return ImageData(x, y)


def build() -> torch.nn.Module:
    entry, params = MODELS.parse({"name": "mlp", "hidden": [16, 16], "norm": "bn"})
    return entry.factory(params, ModelInput(1, 4, 3))


def request(data: ImageData, seed: int = 0, recipe: TrainConfig = RECIPE) -> BaseModelRequest:
    _, params = MODELS.parse({"name": "mlp", "hidden": [16, 16], "norm": "bn"})
    return BaseModelRequest("base", data, torch.arange(len(data)), INFO, "mlp", params, recipe, False, seed)


def test_warmup_then_linear_decay_per_batch() -> None:
    recipe = dataclasses.replace(RECIPE, epochs=10, warmup_epochs=2.0, schedule="warmup_linear")
    f = lr_factor(recipe, steps_per_epoch=5)
    assert [round(f(s), 3) for s in range(10)] == [round((s + 1) / 10, 3) for s in range(10)]
    assert f(10) == 1.0 and f(30) == pytest.approx(0.5) and f(50) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 50))
    assert lr_factor(RECIPE, 5)(7) == 1.0


def test_warmup_is_capped_to_a_fraction_of_a_short_run() -> None:
    """A 5-epoch run of a recipe that warms up 5 epochs: capped at 2.5% it peaks after 1 of 40 steps and decays to
    0 by the end, instead of climbing for the whole run."""
    recipe = dataclasses.replace(RECIPE, epochs=5, warmup_epochs=5.0, schedule="warmup_linear")
    uncapped = lr_factor(recipe, steps_per_epoch=8)
    assert [uncapped(s) for s in (0, 19, 39)] == [1 / 40, 20 / 40, 1.0]  # all warm-up: ends at the peak
    capped = lr_factor(dataclasses.replace(recipe, warmup_max_fraction=0.025), steps_per_epoch=8)
    assert capped(0) == 1.0  # warm-up = int(0.125 epochs * 8) = 1 step
    assert capped(20) == pytest.approx(1 - 19 / 39) and capped(40) == 0.0
    long = dataclasses.replace(recipe, epochs=200, warmup_max_fraction=0.025)
    assert lr_factor(long, 8)(19) == pytest.approx(20 / 40)  # 200 epochs: the cap is the full 5 epochs
    assert lr_factor(long, 8)(40) == 1.0


def test_warmup_cosine_decays_along_a_half_cosine() -> None:
    recipe = dataclasses.replace(RECIPE, epochs=10, warmup_epochs=2.0, schedule="warmup_cosine")
    f = lr_factor(recipe, steps_per_epoch=5)
    assert f(4) == pytest.approx(0.5) and f(10) == 1.0
    assert f(30) == pytest.approx(0.5) and f(20) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(50) == pytest.approx(0.0)
    with pytest.raises(Exception, match="schedule"):
        to_dataclass(TrainConfig, {"schedule": "step"}, "train")


def test_amp_and_channels_last_are_cuda_only() -> None:
    assert isinstance(autocast(torch.device("cpu"), True), type(autocast(torch.device("cpu"), False)))
    with autocast(torch.device("cpu"), True):
        assert not torch.is_autocast_enabled()
    model = build()
    # amp and channels_last on (the default recipe) still trains on CPU in float32
    stats = train_model(model, blobs(), torch.arange(192), INFO, RECIPE, augment=False, seed=0, label="t")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert stats["train_loss"] < 0.5 and stats["images_per_s"] > 0


def test_training_is_deterministic_in_its_seed() -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        model = build()
        train_model(model, blobs(), torch.arange(192), INFO, RECIPE, augment=False, seed=seed, label="t")
        return model.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_or_load_hits_and_retrains_a_corrupted_file(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    data = blobs()
    first, meta = train_or_load(request(data), build, cache)
    assert not meta["cache_hit"]
    second, meta2 = train_or_load(request(data), build, cache)
    assert meta2["cache_hit"] and all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert not second.training  # loaded models come back in eval mode
    # anything that determines the model changes the key: data, seed, recipe
    assert len({request(data).key(), request(data, seed=1).key(), request(blobs(96)).key()}) == 3
    assert request(data).key() != request(data, recipe=dataclasses.replace(RECIPE, lr=0.1)).key()
    assert request(data).key() == request(data, recipe=dataclasses.replace(RECIPE, only=True)).key()
    weights, _, _ = cache.paths(request(data).key())
    raw = bytearray(weights.read_bytes())
    raw[-20] ^= 0xFF
    weights.write_bytes(bytes(raw))
    third, meta3 = train_or_load(request(data), build, cache)
    assert not meta3["cache_hit"]
    assert all(torch.equal(v, third.state_dict()[k]) for k, v in first.state_dict().items())  # same seed, same model


def test_metrics_top1_top5_loss_subsets_and_ensemble() -> None:
    logits = torch.full((4, 6), -10.0)
    logits[0, 0] = 5  # right
    logits[1, 2], logits[1, 1] = 5, 4  # label 1 second: top-5 only
    logits[2, :5] = torch.tensor([5.0, 4, 3, 2, 1])  # label 5 is last: neither
    logits[3, 3] = 5  # right
    labels = torch.tensor([0, 1, 5, 3])
    m = metrics(logits, labels)
    assert m["top1"] == pytest.approx(50.0) and m["top5"] == pytest.approx(75.0)
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    parts = subset_metrics(logits, labels, {"test": torch.arange(4), "first": torch.tensor([0, 1])})
    assert parts["first"]["top1"] == pytest.approx(50.0) and parts["test"] == m
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    assert torch.equal(ensemble_logits([a, b]), torch.tensor([[1.0, 2.0]]))


def test_predict_is_eval_mode_and_in_order() -> None:
    model = build()
    data = blobs(50)
    model.train()
    logits = predict(model, data, torch.arange(50), INFO, batch_size=16)
    assert logits.shape == (50, 3) and not model.training
    single = predict(model, data, torch.tensor([7]), INFO, batch_size=16)
    torch.testing.assert_close(single[0], logits[7])


DATA = blobs(96)  # train.init_seed: YM's code trains A and B with seed 0; null keeps the per-model seed


def test_init_seed_overrides_the_per_model_seed(tmp_path: Path) -> None:
    shared = dataclasses.replace(RECIPE, init_seed=0)
    # model 0 (seed 0) and model 1 (seed 0 + 1) of a run: different unless init_seed is set
    a, _ = train_or_load(request(DATA, 0), build, ModelCache(tmp_path / "a"))
    b, _ = train_or_load(request(DATA, 1), build, ModelCache(tmp_path / "b"))
    b_shared, meta = train_or_load(request(DATA, 1, shared), build, ModelCache(tmp_path / "c"))
    assert not meta["cache_hit"]
    assert not all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all(torch.equal(v, b_shared.state_dict()[k]) for k, v in a.state_dict().items())


def test_init_seed_enters_the_cache_key_as_the_seed_used() -> None:
    # null keeps the keys the cache held before the option existed; a set seed is the seed the model is keyed by
    assert request(DATA, 1, dataclasses.replace(RECIPE, init_seed=0)).key() == request(DATA, 0).key()
    assert request(DATA, 1, dataclasses.replace(RECIPE, init_seed=1)).key() == request(DATA, 1).key()
    assert request(DATA, 1, dataclasses.replace(RECIPE, init_seed=0)).key() != request(DATA, 1).key()


def test_init_seed_is_checked() -> None:
    assert to_dataclass(TrainConfig, {"init_seed": 3}, "train").init_seed == 3
    with pytest.raises(Exception, match="init_seed"):
        to_dataclass(TrainConfig, {"init_seed": -1}, "train")
