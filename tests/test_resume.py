"""Resume after `kill -9`: a sweep killed mid-merge, then mid-training, re-runs to completion; finished runs are
skipped (their rows reused), cached base models are reused, and nothing torn is left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pandas as pd
import pytest

from mergebench.cache import ModelCache, file_digest
from mergebench.pause import MARKER, PAUSE_ENV
from mergebench.results import COLUMNS
from tests.test_cli import MERGEBENCH

# jobs in order: (seed 0, α 0.5) (seed 0, α 0.3) (seed 1, α 0.5) (seed 1, α 0.3). Model i of seed s has init seed
# s + i on the same data, so the sweep needs 3 base models: init seeds 0 and 1 (seed 0), then 2 (seed 1's model B).
# Kills land at points the run announces (MERGEBENCH_PAUSE_AT), never after a sleep: the test is the same on an
# idle and on a loaded machine.
SWEEP = [
    "-m", "seed=0,1", "agg.alpha=0.5,0.3", "align=permute", "merge_data.per_class=50",
    "model.hidden=[64,64]", "train.epochs=3", "train.batch_size=50",
]  # fmt: skip
TIMEOUT = 600  # a safety net for a hung run, never a kill point


class Sweep:
    """The sweep in its own process group, its output collected line by line (kill points watch it)."""

    def __init__(self, cwd: Path, pause_at: str | None = None) -> None:
        env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}  # killed processes lose no output
        env.pop(PAUSE_ENV, None)
        if pause_at:
            env[PAUSE_ENV] = pause_at
        self.proc = subprocess.Popen(
            [MERGEBENCH, *SWEEP], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.paused = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(MARKER):
                self.paused.set()
        self.paused.set()  # the output ended: wake the waiter, which then sees no marker

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill_when_paused(self) -> None:
        """SIGKILL the whole sweep once it announces that it reached its pause point."""
        assert self.paused.wait(TIMEOUT), "pause point never reached"
        assert any(ln.startswith(MARKER) for ln in self.lines), f"sweep ended before its pause point:\n{self.output}"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self) -> str:
        self.proc.wait(timeout=TIMEOUT)
        self.reader.join(timeout=10)
        assert self.proc.returncode == 0, self.output[-3000:]
        return self.output


def hits(output: str) -> int:
    return len(re.findall(r"base \d: cache hit", output))


def finished(sweep: Path, num: int) -> bool:
    return (sweep / str(num) / "results.csv").exists()


def sweeps(cwd: Path) -> set[Path]:
    return set((cwd / "outputs" / "multirun").glob("*/*"))


def models(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "cache" / "models").glob("*.pt"))


@pytest.mark.slow
def test_killed_sweep_resumes(tmp_path: Path) -> None:
    # 1. kill mid-merge: job 0 finishes; job 1 loads seed 0's models from the cache, then pauses before merging
    first = Sweep(tmp_path, pause_at="merge@2")
    first.kill_when_paused()
    (sweep1,) = sweeps(tmp_path)
    assert finished(sweep1, 0) and not finished(sweep1, 1), first.output[-3000:]
    assert hits(first.output) == 2 and len(models(tmp_path)) == 2

    # 2. kill mid-training: job 0 is reused, job 1 merges, job 2 trains init seed 2 (lock taken, weights not yet)
    second = Sweep(tmp_path, pause_at="train_epoch")
    second.kill_when_paused()
    (sweep2,) = sweeps(tmp_path) - {sweep1}
    assert "finished before: reusing" in second.output and finished(sweep2, 1) and not finished(sweep2, 2)
    assert len(models(tmp_path)) == 2 and len(list((tmp_path / "outputs" / "cache" / "models").glob("*.lock"))) == 3

    # 3. run to the end: jobs 0 and 1 are reused, init seed 2 is trained (job 2), then loaded (job 3)
    out = Sweep(tmp_path).finish()
    (sweep3,) = sweeps(tmp_path) - {sweep1, sweep2}
    assert out.count("finished before: reusing") == 2, out[-3000:]
    assert len(re.findall(r"base \d: trained in", out)) == 1 and hits(out) == 3, out[-3000:]

    rows = pd.concat([pd.read_csv(sweep3 / str(j) / "results.csv") for j in range(4)])
    merged = rows[rows.model_role == "merged"]
    assert merged.run_id.nunique() == 4 and set(merged["seed"]) == {0, 1} and set(merged["align"]) == {"permute"}
    for j in range(4):  # a reused job's folder is as complete as a fresh one
        assert {"results.csv", "results.json", "split_manifest.json", "split_indices.npz"} <= {
            p.name for p in (sweep3 / str(j)).iterdir()
        }

    # nothing torn: every cached model matches its recorded digest and loads; every CSV parses whole
    cache = ModelCache(tmp_path / "outputs" / "cache")
    assert len(models(tmp_path)) == 3
    for weights in models(tmp_path):
        meta = json.loads(weights.with_suffix(".json").read_text())
        assert meta["sha256"] == file_digest(weights) and cache.load(weights.stem) is not None
    for csv in (tmp_path / "outputs" / "multirun").rglob("*.csv"):
        assert list(pd.read_csv(csv).columns) == COLUMNS, csv
