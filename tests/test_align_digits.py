"""Aligners on real (embedded digits) models trained on different class subsets: STE against weight matching, and
the sweep over aligners end to end through the `mergebench` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergebench.align import ALIGNERS
from mergebench.context import MergeContext
from mergebench.data.datasets import load_dataset
from mergebench.data.loader import Batches
from mergebench.data.merge_data import MergeData
from mergebench.evaluate import evaluate_batches
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.spec import apply_transforms
from mergebench.weights import mean_model
from tests.conftest import SHARED_DATA

MERGEBENCH = str(Path(sys.executable).parent / "mergebench")


def small_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get("mlp")
    return entry.factory(to_dataclass(entry.params, {"hidden": [32, 32]}, "model"), ModelInput(1, 8, 10))


@pytest.fixture(scope="module")
def digit_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, MergeContext]:
    """Model A trained on digits 0-4, model B on 5-9 (Adam, as the MLP recipe); merge data = the union."""
    info, train, test = load_dataset("digits", tmp_path_factory.mktemp("data"))
    models = []
    for seed, classes in enumerate((train.y < 5, train.y >= 5)):
        model = small_mlp(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(10):
            for x, y in Batches(train, torch.nonzero(classes).flatten(), info, 100, shuffle=True, seed=seed):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        models.append(model.eval())
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    ctx = MergeContext(
        spec=models[0].permutation_spec(),
        build_model=lambda: small_mlp(0),
        train=train,
        test=test,
        info=info,
        merge=MergeData(fit=order[150:].sort().values, val=order[:150].sort().values),
        batch_size=100,
        eval_batch_size=1000,
        device=torch.device("cpu"),
        seed=0,
    )
    return models[0], models[1], ctx


def merge_data_loss(model_a: nn.Module, model_b: nn.Module, ctx: MergeContext, aligner: str, **params: object) -> dict:
    entry = ALIGNERS.get(aligner)
    alignment = entry.factory(to_dataclass(entry.params, params, "align"), [model_a, model_b], ctx)
    aligned = apply_transforms(model_b.state_dict(), ctx.spec, alignment.transforms[1])
    merged = mean_model([model_a.state_dict(), aligned], ctx)
    return {**evaluate_batches(merged, ctx.fit_batches(batch_size=1000)), **alignment.diagnostics}


def test_ste_midpoint_beats_weight_matching_on_merge_data(digit_pair: tuple) -> None:
    model_a, model_b, ctx = digit_pair
    for model in (model_a, model_b):  # the endpoints are decent experts on their own halves
        assert evaluate_batches(model, ctx.fit_batches(batch_size=1000))["top1"] > 45
    wm = merge_data_loss(model_a, model_b, ctx, "weight_matching")
    ste = merge_data_loss(model_a, model_b, ctx, "ste", epochs=3)
    assert ste["loss"] < wm["loss"]
    assert ste["best_epoch"] >= 1, "the weight-matching start must not be the best permutation"
    assert ste["held_out_loss"] < ste["wm_held_out_loss"]
    assert ste["seconds"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "MNIST").is_dir(), reason="runs next to the other CLI tests' data root")
def test_sweep_over_aligners_real_aligners_beat_identity(tmp_path: Path) -> None:
    """The issue's done-when: four result sets; on BN-free MLPs trained on disjoint digit classes, permute, weight
    matching and CCA all beat direct averaging on test top-1."""
    args = [
        "-m",
        "align=identity,permute,weight_matching,cca",
        "data=split_classes",
        "dataset=digits",
        "model=mlp",
        "model.hidden=[128,128,128]",
        "train.epochs=30",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {**os.environ, "MERGEBENCH_DATA": str(SHARED_DATA), "COLUMNS": "200"}
    proc = subprocess.run([MERGEBENCH, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    frames = [pd.read_csv(p) for p in sorted((tmp_path / "sweep").glob("*/results.csv"))]
    assert len(frames) == 4
    df = pd.concat(frames)
    merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")].set_index("align")
    assert sorted(merged.index) == ["cca", "identity", "permute", "weight_matching"]
    for aligner in ("permute", "weight_matching", "cca"):
        assert merged.loc[aligner, "value"] > merged.loc["identity", "value"] + 5, merged["value"]
    assert "align_objective" in merged.loc["weight_matching", "diagnostics"]
    assert "align_gamma" in merged.loc["cca", "diagnostics"]
    assert "align_mean_corr" in merged.loc["permute", "diagnostics"]
