"""Resume after `kill -9`: a sweep killed mid-merge, then mid-training, re-runs to completion; finished runs are
skipped (their rows reused), cached base models are reused, and nothing torn is left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from mergebench.cache import ModelCache, file_digest
from mergebench.results import COLUMNS
from tests.test_cli import MERGEBENCH

# jobs in order: (seed 0, α 0.5) (seed 0, α 0.3) (seed 1, α 0.5) (seed 1, α 0.3), each merged by STE (300 one-batch
# steps: seconds, so a kill lands mid-merge). Model i of seed s has init seed s + i on the same data, so the sweep
# needs 3 base models: init seeds 0 and 1 (seed 0), then 2 (seed 1's model B); 30 epochs of batch 50 take ~1 s each.
SWEEP = [
    "-m", "seed=0,1", "agg.alpha=0.5,0.3", "align=ste", "align.epochs=300", "align.batch_size=500",
    "merge_data.per_class=50", "model.hidden=[64,64]", "train.epochs=30", "train.batch_size=50",
]  # fmt: skip
TIMEOUT = 240


class Sweep:
    """The sweep in its own process group, its output collected line by line (kill points watch it)."""

    def __init__(self, cwd: Path) -> None:
        env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}  # killed processes lose no output
        self.proc = subprocess.Popen(
            [MERGEBENCH, *SWEEP], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill_when(self, ready: Callable[[], bool], delay: float) -> None:
        """SIGKILL the whole sweep `delay` s after `ready()` turns true."""
        deadline = time.monotonic() + TIMEOUT
        while not ready():
            assert self.proc.poll() is None, f"sweep ended before the kill point:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.05)
        time.sleep(delay)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self) -> str:
        self.proc.wait(timeout=TIMEOUT)
        self.reader.join(timeout=10)
        assert self.proc.returncode == 0, self.output[-3000:]
        return self.output


def hits(output: str) -> int:
    return len(re.findall(r"base \d: cache hit", output))


def finished(cwd: Path, num: int) -> bool:
    return any((cwd / "outputs" / "multirun").glob(f"*/*/{num}/results.csv"))


def models(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "cache" / "models").glob("*.pt"))


@pytest.mark.slow
def test_killed_sweep_resumes(tmp_path: Path) -> None:
    # 1. kill mid-merge: job 1 loads seed 0's models from the cache (2 hits), then runs STE
    first = Sweep(tmp_path)
    first.kill_when(lambda: hits(first.output) == 2, delay=1.0)
    assert finished(tmp_path, 0) and not finished(tmp_path, 1), first.output[-3000:]
    assert len(models(tmp_path)) == 2
    time.sleep(1.1)  # a new sweep folder (Hydra names them by the second)

    # 2. kill mid-training: job 2 loads init seed 1, trains init seed 2 (its lock exists, its weights not yet)
    second = Sweep(tmp_path)
    locks = tmp_path / "outputs" / "cache" / "models"
    second.kill_when(lambda: len(list(locks.glob("*.lock"))) == 3, delay=0.1)
    assert "finished before: reusing" in second.output
    assert len(models(tmp_path)) == 2, "the kill came after training: lengthen train.epochs"
    time.sleep(1.1)

    # 3. run to the end: jobs 0 and 1 are reused, init seed 2 is trained (job 2), then loaded (job 3)
    out = Sweep(tmp_path).finish()
    assert out.count("finished before: reusing") == 2, out[-3000:]
    assert len(re.findall(r"base \d: trained in", out)) == 1 and hits(out) == 3, out[-3000:]

    sweeps = sorted((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 3
    rows = pd.concat([pd.read_csv(sweeps[-1] / str(j) / "results.csv") for j in range(4)])
    merged = rows[rows.model_role == "merged"]
    assert merged.run_id.nunique() == 4 and set(merged["seed"]) == {0, 1} and set(merged["align"]) == {"ste"}

    # nothing torn: every cached model matches its recorded digest and loads; every CSV parses whole
    cache = ModelCache(tmp_path / "outputs" / "cache")
    assert len(models(tmp_path)) == 3
    for weights in models(tmp_path):
        meta = json.loads(weights.with_suffix(".json").read_text())
        assert meta["sha256"] == file_digest(weights) and cache.load(weights.stem) is not None
    for csv in (tmp_path / "outputs").rglob("*.csv"):
        assert list(pd.read_csv(csv).columns) == COLUMNS, csv
