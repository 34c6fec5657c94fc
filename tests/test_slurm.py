"""A smoke sweep through a real SLURM scheduler (scripts/slurm_local.sh start): 4 concurrent jobs of one job array
share the base-model cache, so every base model is trained exactly once; mergebench-report builds the table."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from mergebench.report import main as report_main
from tests.test_cli import cli

ANGLES = [0, 30, 60, 90]


def idle_node() -> str | None:
    """Why the scheduler cannot run the test, or None when it can."""
    if shutil.which("sbatch") is None:
        return "sbatch not found (start a cluster with scripts/slurm_local.sh start, as root)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    return None if {"idle", "mix"} & set(states) else f"no idle SLURM node (sinfo states: {states or 'none'})"


SKIP_REASON = idle_node()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))]


def test_slurm_sweep_trains_each_base_model_once(tmp_path: Path) -> None:
    launcher = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.array_parallelism=4",
    ]
    args = ["-m", "experiment=ym_table1", "dataset=digits", "smoke=true", "seed=0"]
    proc = cli([*args, f"data.angle={','.join(map(str, ANGLES))}", *launcher], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    logs = sorted(sweep.glob(".submitit/*_*/*_log.out"))
    assert len(logs) == len(ANGLES), [p.name for p in logs]
    text = "\n".join(p.read_text() for p in logs)
    trained = re.findall(r"base \d: trained in [\d.]+s \((\w+)\)", text)
    hits = re.findall(r"base \d: cache hit \((\w+)\)", text)
    # model A (MNIST-like digits, seed 0) is the same in all 4 jobs; each job's model B (its own angle) differs
    assert len(trained) == len(set(trained)) == 1 + len(ANGLES), text
    assert len(hits) == len(ANGLES) - 1 and set(hits) <= set(trained), text
    cached = sorted(p.stem for p in (tmp_path / "outputs" / "cache" / "models").glob("*.pt"))
    assert cached == sorted(trained)

    assert report_main([str(sweep), "--paper", "ym_table1"]) == 0
    table = pd.read_csv(sweep / "tables" / "ym_table1.csv", index_col=0)
    ours = [f"{a}°" for a in ANGLES]
    assert all(table.loc["Weight Matching", col] != "—" for col in ours)
    assert str(table.loc["Weight Matching", "90° paper"]) == "70.86"
