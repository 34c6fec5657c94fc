"""YM's STE and Coreset AB recipe options: the STE's weight decay, momentum and multi-step schedule, coresets drawn
per class from each client's data, and the Coreset reference's own epochs and lr. Each test fails if its option is
ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import mergebench.references as references
import mergebench.run as pipeline
from mergebench.align import ALIGNERS
from mergebench.align.ste import STEParams, epoch_lr
from mergebench.cli import CONF_DIR
from mergebench.config import TrainConfig, validate
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.merge_data import MergeDataConfig, select_merge_data
from mergebench.data.splits import Scenario
from mergebench.errors import ConfigError
from mergebench.registry import to_dataclass
from mergebench.train import BaseModelRequest, train_best_epoch
from tests.test_align import build, fake_context


def test_multi_step_divides_the_lr_by_ten_after_half_and_three_quarters_of_the_epochs() -> None:
    params = STEParams(epochs=1000, lr=0.1, schedule="multi_step")
    lrs = {e: epoch_lr(params, e) for e in (1, 500, 501, 750, 751, 1000)}
    assert lrs == pytest.approx({1: 0.1, 500: 0.1, 501: 0.01, 750: 0.01, 751: 0.001, 1000: 0.001})
    assert epoch_lr(STEParams(epochs=1000, lr=0.1), 1000) == 0.1  # constant: the default


def ste(**params: object) -> dict:
    """STE diagnostics for B = A re-initialised, on a small MLP and fake data."""
    model_a = build("mlp", {"hidden": [16, 16]}, 1, 8, "none", seed=0)
    model_b = build("mlp", {"hidden": [16, 16]}, 1, 8, "none", seed=1)
    values = to_dataclass(STEParams, {"epochs": 2, "lr": 0.05, **params}, "align")
    return ALIGNERS.get("ste").factory(values, [model_a, model_b], fake_context(model_a, 1, 8)).diagnostics


def test_ste_weight_decay_momentum_and_schedule_change_the_run() -> None:
    plain = ste()
    assert ste()["free_shift"] == pytest.approx(plain["free_shift"])  # the same run twice: the same θ̃
    assert ste(weight_decay=1.0)["free_shift"] != pytest.approx(plain["free_shift"])
    assert ste(momentum=0.0)["free_shift"] != pytest.approx(plain["free_shift"])
    scheduled = ste(epochs=4, schedule="multi_step")
    assert scheduled["final_lr"] == pytest.approx(0.05 * 0.01)


def test_bad_ste_recipe_values_are_one_line_errors() -> None:
    for bad in ({"schedule": "cosine"}, {"weight_decay": -1}, {"momentum": 1.0}):
        with pytest.raises(ConfigError):
            to_dataclass(STEParams, bad, "align")


def two_clients() -> Scenario:
    """Two disjoint clients of 100 examples, 10 of each class in each."""
    y = torch.arange(200) % 10
    data = ImageData(torch.zeros(200, 1, 4, 4, dtype=torch.uint8), y)
    info = DatasetInfo("fake", 10, 1, 4, (0.5,), (0.25,), False)
    return Scenario(info, data, data, [torch.arange(100), torch.arange(100, 200)], {})


def test_each_client_coreset_takes_k_per_class_from_every_client() -> None:
    scenario = two_clients()
    for per_class_from, per_client in (("union", None), ("each_client", 3)):
        cfg = MergeDataConfig(per_class=3, per_class_from=per_class_from, val_fraction=0.1)
        merge = select_merge_data(scenario, cfg)
        chosen = torch.cat([merge.fit, merge.val])
        assert torch.bincount(scenario.train.y[chosen], minlength=10).tolist() == [3 * (2 if per_client else 1)] * 10
        if per_client:
            for client in scenario.clients:
                mine = chosen[torch.isin(chosen, client)]
                assert torch.bincount(scenario.train.y[mine], minlength=10).tolist() == [per_client] * 10
    with pytest.raises(ConfigError):
        to_dataclass(MergeDataConfig, {"source": "0", "per_class": 3, "per_class_from": "each_client"}, "merge_data")


def test_coreset_reference_trains_with_its_own_recipe_and_base_models_keep_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipes: dict[str, tuple[int, float]] = {}
    train_or_load = references.train_or_load

    def recording(request: BaseModelRequest, *args: object) -> tuple:
        recipes[request.label] = (request.recipe.epochs, request.recipe.lr)
        return train_or_load(request, *args)

    monkeypatch.setattr(references, "train_or_load", recording)
    overrides = ["data=split_classes", "model.hidden=[16]", "train.epochs=1", "train.lr=0.1", "align=identity"]
    overrides += ["references.coreset=true", "merge_data.per_class=5", "references.coreset_epochs=2"]
    overrides += ["references.coreset_lr=0.05", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = validate(compose("config", overrides=overrides))
    pipeline.run(cfg, tmp_path / "out")
    assert recipes["coreset"] == (2, 0.05)
    assert recipes["base 0"] == recipes["base 1"] == (1, 0.1)


def test_best_epoch_training_returns_the_weights_of_the_best_scored_epoch() -> None:
    data = ImageData(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.arange(40) % 4)
    info = DatasetInfo("fake", 4, 1, 8, (0.5,), (0.25,), False)
    recipe = TrainConfig(epochs=5, batch_size=10, optimizer="sgd", lr=0.1, amp=False)
    request = BaseModelRequest("coreset", data, torch.arange(40), info, "mlp", None, recipe, False, 0)
    states: list[dict[str, torch.Tensor]] = []

    def score(model: torch.nn.Module) -> float:  # peaks at epoch 3, then falls
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return -abs(len(states) - 3)

    model, meta = train_best_epoch(request, lambda: build("mlp", {"hidden": [8]}, 1, 8, "none", seed=0), score)
    assert meta["best_epoch"] == 3 and meta["epoch_scores"] == [-2, -1, 0, -1, -2]
    for name, value in model.state_dict().items():
        assert torch.equal(value, states[2][name]), name
    assert not torch.equal(model.state_dict()["head.weight"], states[-1]["head.weight"])  # not the last epoch


def test_coreset_report_best_test_epoch_reports_the_best_epoch_test_top1(tmp_path: Path) -> None:
    overrides = ["data=split_classes", "model.hidden=[16]", "train.epochs=1", "align=identity"]
    overrides += ["references.coreset=true", "merge_data.per_class=5", "references.coreset_epochs=6"]
    overrides += ["references.coreset_report=best_test_epoch", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = validate(compose("config", overrides=overrides))
    rows = pipeline.run(cfg, tmp_path / "out")
    coreset = rows[(rows.model_role == "coreset") & (rows.metric == "top1") & (rows.subset == "test")].iloc[0]
    diagnostics = json.loads(coreset.diagnostics)
    assert diagnostics["coreset_report"] == "best_test_epoch" and len(diagnostics["epoch_scores"]) == 6
    assert coreset.value == pytest.approx(max(diagnostics["epoch_scores"]))
    assert diagnostics["epoch_scores"][diagnostics["best_epoch"] - 1] == max(diagnostics["epoch_scores"])


def test_an_unknown_coreset_report_is_refused_naming_the_allowed_values() -> None:
    with (
        pytest.raises(ConfigError, match=r"coreset_report='best' is not known; allowed: last, best_test_epoch"),
        initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)),
    ):
        validate(compose("config", overrides=["references.coreset_report=best"]))


def test_keep_train_batch_keeps_the_lowest_training_batch_loss_and_never_scores_held_out_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mergebench.align.ste as ste_module

    losses: list[float] = []
    cross_entropy = ste_module.F.cross_entropy

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        loss = cross_entropy(*args, **kwargs)
        losses.append(loss.item())
        return loss

    def no_held_out(*args: object, **kwargs: object) -> None:
        raise AssertionError("keep=train_batch scored held-out data")

    monkeypatch.setattr(ste_module, "evaluate_batches", no_held_out)
    monkeypatch.setattr(ste_module.F, "cross_entropy", recording)
    diagnostics = ste(keep="train_batch", epochs=3)
    assert diagnostics["keep"] == "train_batch" and "held_out_loss" not in diagnostics
    assert diagnostics["train_batch_loss"] == pytest.approx(min(losses)) and diagnostics["best_epoch"] >= 1


def test_an_unknown_ste_keep_is_refused_naming_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"keep='best' is not known; allowed: held_out, train_batch"):
        to_dataclass(STEParams, {"keep": "best"}, "align").check()
