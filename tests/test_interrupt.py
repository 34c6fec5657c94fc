"""Ctrl-C anywhere in a sweep (issue 21): one line and exit 130 under each launcher, no traceback from mergebench or
from the processes it started (joblib's workers, submitit's controllers and jobs), and every finished job's results
kept. The sweep runs in its own process group and gets SIGINT as a terminal sends it on Ctrl-C, to the whole group,
at a point it announces (MERGEBENCH_PAUSE_AT), never after a sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from mergebench.interrupts import INTERRUPTED
from mergebench.pause import MARKER, PAUSE_ENV
from tests.test_cli import MERGEBENCH, default_sigint

# two jobs (identity, then permute) on small digits models: each takes about a second once the models are built
SWEEP = [
    "-m", "align=identity,permute", "model.hidden=[16]", "train.epochs=1", "train.batch_size=100",
    "data.train_limit=300", "data.test_limit=100",
]  # fmt: skip
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],  # one worker: job 1 waits for job 0
    "submitit_local": ["hydra/launcher=submitit_local"],  # every job in its own process at once, logs in .submitit/
}
TIMEOUT = 300  # a safety net for a hung sweep, never an interrupt point


class Sweep:
    """The sweep in its own session (process group); its stdout and stderr, merged, collected line by line."""

    def __init__(self, tmp: Path, launcher: str, pause_at: str) -> None:
        self.dir = tmp / "sweep"
        env = {**os.environ, PAUSE_ENV: pause_at, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        args = [*SWEEP, *LAUNCHERS[launcher], f"cache_dir={tmp / 'cache'}", f"hydra.sweep.dir={self.dir}"]
        self.proc = subprocess.Popen(
            [MERGEBENCH, *args], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, preexec_fn=default_sigint,
        )  # fmt: skip
        self.lines: list[str] = []
        self.ended = threading.Event()  # every process holding the output ended: nothing was left running
        self.changed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.changed.set()
        self.ended.set()
        self.changed.set()

    def job_logs(self) -> list[Path]:
        """submitit's job processes write to their logs, not to the sweep's output."""
        return sorted(self.dir.glob(".submitit/*/*_log.*"))

    def announced(self) -> bool:
        logs = (p.read_text() for p in self.job_logs())
        return any(ln.startswith(MARKER) for ln in self.lines) or any(MARKER in text for text in logs)

    def interrupt_when_paused(self) -> list[str]:
        """Ctrl-C once the sweep (or one of its jobs) announced its pause point; the lines printed after it."""
        deadline = time.monotonic() + TIMEOUT
        while not self.announced():
            assert not self.ended.is_set(), "sweep ended before its pause point:\n" + "".join(self.lines)[-3000:]
            assert time.monotonic() < deadline, "pause point never reached:\n" + "".join(self.lines)[-3000:]
            self.changed.wait(0.2)  # a new line, or another look at the job logs
            self.changed.clear()
        seen = len(self.lines)
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=TIMEOUT)
        assert self.ended.wait(TIMEOUT), "a process of the sweep kept running after the interrupt"
        return self.lines[seen:]


def finished_jobs(sweep: Path) -> set[int]:
    return {int(csv.parent.name) for csv in sweep.glob("*/results.csv")}


# (launcher, pause point, jobs that must have finished, jobs that may have). Every job of a submitit sweep starts at
# once in its own process, and each pauses at its own first arrival at the point. The cases marked slow take the
# same way out as an unmarked one (the main process alone, or a job process of the same launcher).
def case(launcher: str, point: str, must: set[int], may: set[int], slow: bool = False) -> object:
    return pytest.param(launcher, point, must, may, id=f"{launcher}-{point}", marks=[pytest.mark.slow] if slow else [])


CASES = [
    # before the first job: Hydra is set up and about to launch
    case("basic", "sweep_start", set(), set()),
    case("joblib", "sweep_start", set(), set(), slow=True),
    case("submitit_local", "sweep_start", set(), set(), slow=True),
    # Hydra printed the job table and starts a job (in joblib's worker, in submitit's job processes)
    case("basic", "job_start", set(), set(), slow=True),
    case("joblib", "job_start", set(), set()),
    case("submitit_local", "job_start", set(), set(), slow=True),
    # mid-job, training a base model
    case("basic", "train_epoch", set(), set(), slow=True),
    case("joblib", "train_epoch", set(), set()),
    case("submitit_local", "train_epoch", set(), set()),
    # between jobs: job 0 wrote its results; under submitit, whichever job announced it first did
    case("basic", "job_end", {0}, set()),
    case("joblib", "job_end", {0}, set(), slow=True),
    case("submitit_local", "job_end", set(), {0, 1}),
]


@pytest.mark.parametrize(("launcher", "point", "must", "may"), CASES)
def test_ctrl_c_in_a_sweep_is_one_line_and_keeps_finished_jobs(
    tmp_path: Path, launcher: str, point: str, must: set[int], may: set[int]
) -> None:
    sweep = Sweep(tmp_path, launcher, point)
    after = sweep.interrupt_when_paused()
    output = "".join(sweep.lines)
    assert sweep.proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    said = [ln.strip() for ln in after if ln.strip() and not ln.startswith(MARKER)]  # other jobs may pause too
    assert said == [INTERRUPTED], output[-3000:]
    for log in sweep.job_logs():  # submitit's job processes end quietly too
        assert "Traceback" not in log.read_text(), log.read_text()

    finished = finished_jobs(sweep.dir)
    assert must <= finished <= must | may and (finished or point != "job_end"), finished
    for job in finished:  # written whole (temporary name, then renamed): nothing torn
        assert len(pd.read_csv(sweep.dir / str(job) / "results.csv")) > 0
    assert not list(tmp_path.rglob("*.tmp")), list(tmp_path.rglob("*.tmp"))
