"""The interpolation curve: barrier formula, identical models, endpoints equal to the base models, K = 2 only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from mergebench.config import Component, validate
from mergebench.context import MergeContext
from mergebench.data.datasets import load_dataset
from mergebench.data.merge_data import MergeData
from mergebench.errors import ConfigError
from mergebench.evaluate import metrics, predict
from mergebench.merging import REPAIRS
from mergebench.merging.curve import barrier, barriers, curve_alphas, interpolation_curve
from mergebench.models import MODELS, ModelInput
from mergebench.run import run


def test_alphas_are_evenly_spaced_from_b_to_a() -> None:
    assert curve_alphas(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve_alphas(2) == [0.0, 1.0]


def test_barrier_of_known_curves() -> None:
    alphas = curve_alphas(5)
    # loss bump on top of the chord 1 + α: (1 + α) + c·α(1-α) rises c/4 above it at α = 0.5
    bump = [1 + a + 0.8 * a * (1 - a) for a in alphas]
    assert barrier(alphas, bump, higher_is_better=False) == pytest.approx(0.2)
    # a convex loss lies below its chord: no barrier
    convex = [(a - 0.3) ** 2 for a in alphas]
    assert barrier(alphas, convex, higher_is_better=False) == 0.0
    # accuracy dip below the chord 90 + 5α, deepest (d/4 = 10) at the midpoint
    dip = [90 + 5 * a - 40 * a * (1 - a) for a in alphas]
    assert barrier(alphas, dip, higher_is_better=True) == pytest.approx(10.0)
    points = [(a, {"test": {"top1": acc, "loss": loss}}) for a, acc, loss in zip(alphas, dip, bump)]
    assert barriers(points)["test"] == pytest.approx(
        {"acc_barrier": 10.0, "acc_barrier_mid": 10.0, "loss_barrier": 0.2, "loss_barrier_mid": 0.2}
    )
    # an even number of points has no midpoint
    assert set(barriers(points[:2] + points[3:])["test"]) == {"acc_barrier", "loss_barrier"}


def test_curve_of_identical_models_has_no_barrier() -> None:
    info, train, test = load_dataset("digits", ".")
    entry = MODELS.get("mlp")

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return entry.factory(entry.params(hidden=[16]), ModelInput(1, 8, 10))

    repair_none = Component("none", REPAIRS.get("none").factory, None)
    model = build()
    ctx = MergeContext(
        spec=model.permutation_spec(),
        build_model=build,
        train=train,
        test=test,
        info=info,
        merge=MergeData(fit=torch.arange(256), val=torch.arange(0)),
        batch_size=128,
        eval_batch_size=512,
        device=torch.device("cpu"),
        seed=0,
    )
    points = []
    for alpha, merged in interpolation_curve(model, build(), 5, repair_none, ctx):
        logits = predict(merged, test, torch.arange(len(test)), info, 512)
        points.append((alpha, {"test": metrics(logits, test.y)}))
    result = barriers(points)["test"]
    assert result["acc_barrier"] == 0.0
    assert result["loss_barrier"] == pytest.approx(0.0, abs=1e-6)


def test_curve_needs_two_models() -> None:
    raw = {
        key: {"name": name}
        for key, name in [("model", "mlp"), ("align", "identity"), ("agg", "avg"), ("repair", "none")]
    }
    with pytest.raises(ConfigError, match=r"curve\.points=3 needs data\.num_models=2, not 3"):
        validate({**raw, "data": {"num_models": 3}, "curve": {"points": 3}})


def test_run_writes_curve_rows_whose_endpoints_are_the_base_models(tmp_path: Path) -> None:
    raw = {
        "name": "t",
        "device": "cpu",
        "cache_dir": str(tmp_path / "cache"),
        "data": {"name": "split_classes", "dataset": {"name": "digits"}},
        "model": {"name": "mlp", "hidden": [32, 32]},
        "train": {"epochs": 3, "batch_size": 256, "optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0,
                  "warmup_epochs": 0.0, "schedule": "constant", "amp": False},
        "align": {"name": "permute"},
        "agg": {"name": "avg"},
        "repair": {"name": "none"},
        "curve": {"points": 3},
    }  # fmt: skip
    df = run(validate(raw), tmp_path)
    curve = df[df.model_role == "curve"]
    assert sorted(curve.alpha.unique()) == [0.0, 0.5, 1.0]
    assert set(curve.method_label) == {"Permute"}

    def values(frame: pd.DataFrame) -> pd.Series:
        return frame.set_index(["subset", "metric"]).value.sort_index()

    # α is model A's weight: α = 1 is model A, α = 0 the aligned model B (the same function as model B)
    pd.testing.assert_series_equal(values(curve[curve.alpha == 1.0]), values(df[df.model_role == "base_0"]))
    pd.testing.assert_series_equal(
        values(curve[curve.alpha == 0.0]), values(df[df.model_role == "base_1"]), atol=1e-5, rtol=1e-5
    )
    # the α = 0.5 point is the merged model of this run (avg, α = 0.5)
    pd.testing.assert_series_equal(
        values(curve[curve.alpha == 0.5]), values(df[df.model_role == "merged"]), atol=1e-5, rtol=1e-5
    )
    barrier_rows = df[df.model_role == "barrier"]
    assert set(barrier_rows.subset) == set(curve.subset)
    test = barrier_rows[barrier_rows.subset == "test"].set_index("metric").value
    assert set(test.index) == {"acc_barrier", "acc_barrier_mid", "loss_barrier", "loss_barrier_mid"}
    point = curve[curve.subset == "test"].set_index(["alpha", "metric"]).value
    chord = (point[(0.0, "top1")] + point[(1.0, "top1")]) / 2
    assert test["acc_barrier_mid"] == pytest.approx(chord - point[(0.5, "top1")])
    assert test["acc_barrier"] == pytest.approx(max(0.0, test["acc_barrier_mid"]))
    assert test["acc_barrier"] > 0  # two models trained on disjoint classes do not average for free
