"""The `mergebench` command end to end: one-line errors for bad input, CSV rows, and the base-model cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import SHARED_DATA

MERGEBENCH = str(Path(sys.executable).parent / "mergebench")
SMALL = ["model.hidden=[32,32]", "train.epochs=2", "train.batch_size=256"]


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MERGEBENCH_DATA": str(SHARED_DATA), "COLUMNS": "200", **env}
    return subprocess.run([MERGEBENCH, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def results_of(cwd: Path) -> pd.DataFrame:
    (csv,) = (cwd / "outputs" / "runs").glob("*/*/results.csv")
    return pd.read_csv(csv)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["align=foo"], "align='foo' is not known; allowed: identity"),
        (["dataset=imagenet"], "dataset='imagenet' is not known; allowed: cifar10, cifar100, digits"),
        (["foo=1"], "foo is not a known key"),
        (["+foo=1"], "foo is not a known key; allowed:"),
        (["model.widht=2"], "model.widht is not a known key"),
        (["model.width=abc"], "model.width"),
        (["model.width=0"], "model.width=0 must be > 0"),
        (["data.num_models=1"], "data.num_models=1 must be >= 2"),
        (["data=dirichlet", "data.concentration=-1"], "data.concentration=-1.0 must be > 0"),
        (["-m", "align=identity,nope"], "align='nope' is not known"),
        (["dataset=cifar10", "data.root=/nonexistent/data"], "/nonexistent/data"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = cli(args, tmp_path)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert lines and message in lines[-1], proc.stderr
    assert len(lines) == 1, proc.stderr


def test_digits_run_writes_rows_and_second_run_hits_cache(tmp_path: Path) -> None:
    args = ["data=split_classes", "repair=reset_bn", "model.norm=bn", *SMALL]
    first = cli(args, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "cache hit" not in first.stdout
    df = results_of(tmp_path)
    roles = set(df.model_role)
    assert {"base_0", "base_1", "base_avg", "ensemble", "merged"} <= roles
    assert set(df.subset) == {"test", "classes_0", "classes_1"}
    assert set(df.metric) == {"top1", "top5", "loss"}
    merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    assert merged.method_label.tolist() == ["Direct averaging"]
    assert df.run_id.nunique() == 1 and (df.dataset == "digits").all() and (df.repair == "reset_bn").all()
    run_dir = next((tmp_path / "outputs" / "runs").glob("*/*"))
    assert (run_dir / "split_manifest.json").exists() and (run_dir / "split_indices.npz").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    second = cli(args, tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("cache hit") == 2, second.stdout


def test_real_mnist_dirichlet_run(tmp_path: Path, shared_data: Path) -> None:
    args = ["data=dirichlet", "dataset=mnist", f"data.root={shared_data}", "model=mlp", "train.epochs=1"]
    proc = cli(
        [*args, "data.train_limit=6000", "data.test_limit=2000", "model.hidden=[128,128]", "train.batch_size=100"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    df = results_of(tmp_path)
    top1 = df[(df.metric == "top1") & (df.subset == "test")].set_index("model_role")["value"]
    assert top1["base_0"] > 50 and top1["base_1"] > 50  # one epoch on 3000 examples each still learns
    assert top1["ensemble"] >= min(top1["base_0"], top1["base_1"])
    assert (df.dataset == "mnist").all() and (df.split == "dirichlet").all()
