"""Trust on a fresh machine (issue 8): diverging recipes, Ctrl-C, stale data, damaged or crafted cache files and
CIFAR batches, distinct output folders for simultaneous runs, and progress lines in logs. Interruptions land at
points the run announces (MERGEBENCH_PAUSE_AT), never after a sleep."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from mergebench.cache import file_digest
from mergebench.data.datasets import load_dataset
from mergebench.errors import DataError
from mergebench.pause import MARKER, PAUSE_ENV
from tests.fake_data import write_cifar, write_idx
from tests.test_cli import MERGEBENCH, SMALL, cli, default_sigint

TINY = [*SMALL, "train.epochs=1"]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def cached_models(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "cache" / "models").glob("*.pt"))


def test_diverging_recipe_stops_with_one_line_and_caches_nothing(tmp_path: Path) -> None:
    proc = cli([*SMALL, "train.lr=1e9"], tmp_path)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert line.startswith("error: training diverged: base 0") and "train.lr=1e+09" in line, line
    assert cached_models(tmp_path) == []


class Paused:
    """A run started with a pause point; `wait()` returns once it announced the point."""

    def __init__(self, args: list[str], cwd: Path, point: str) -> None:
        env = {**os.environ, PAUSE_ENV: point, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        env.pop("MERGEBENCH_CACHE", None)
        self.proc = subprocess.Popen(
            [MERGEBENCH, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )

    def wait(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARKER):
                return
        raise AssertionError(
            f"the run ended before its pause point: {self.proc.stderr.read() if self.proc.stderr else ''}"
        )

    def stop(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, err


def test_ctrl_c_ends_with_one_line_and_exit_130(tmp_path: Path) -> None:
    run = Paused(TINY, tmp_path, "train_epoch")
    run.wait()
    code, err = run.stop(signal.SIGINT)
    assert code == 130 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err
    assert cached_models(tmp_path) == []  # the interrupted model is not cached half-trained
    assert not list((tmp_path / "outputs").rglob("*.tmp"))  # nothing torn


def test_runs_started_together_get_their_own_folders(tmp_path: Path) -> None:
    """Both runs hold their output folder (created before the pause point) at the same time."""
    runs = [Paused(TINY, tmp_path, "run_start") for _ in range(2)]
    for run in runs:
        run.wait()
    folders = list((tmp_path / "outputs" / "runs").glob("*/*"))
    for run in runs:
        run.stop(signal.SIGKILL)
    assert len(folders) == 2, folders


def test_changed_data_under_the_same_root_is_recomputed(tmp_path: Path) -> None:
    write_idx(tmp_path / "data", "MNIST", n_train=200, n_test=100)
    args = ["dataset=mnist", f"data.root={tmp_path / 'data'}", *TINY]
    first = cli([*args, "hydra.run.dir=outputs/first"], tmp_path)
    assert first.returncode == 0, first.stderr
    again = cli([*args, "hydra.run.dir=outputs/again"], tmp_path)
    assert "finished before: reusing" in again.stdout

    labels = tmp_path / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    payload = bytearray(gzip.decompress(labels.read_bytes()))
    payload[8:] = bytes((b + 3) % 10 for b in payload[8:])  # same files, same sizes, other test labels
    labels.write_bytes(gzip.compress(bytes(payload)))
    changed = cli([*args, "hydra.run.dir=outputs/changed"], tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert "finished before" not in changed.stdout
    old, new = (pd.read_csv(tmp_path / "outputs" / d / "results.csv") for d in ("first", "changed"))
    assert not old["value"].equals(new["value"])


def test_damaged_results_cache_is_recomputed_and_reuse_is_complete(tmp_path: Path) -> None:
    first = cli([*TINY, "hydra.run.dir=outputs/first"], tmp_path)
    assert first.returncode == 0, first.stderr
    reused = cli([*TINY, "hydra.run.dir=outputs/reused"], tmp_path)
    assert "finished before: reusing" in reused.stdout
    fresh_files = {p.name for p in (tmp_path / "outputs" / "first").iterdir()}
    assert {p.name for p in (tmp_path / "outputs" / "reused").iterdir()} == fresh_files
    assert {"results.csv", "results.json", "split_manifest.json", "split_indices.npz"} <= fresh_files

    (entry,) = (tmp_path / "outputs" / "cache" / "results").iterdir()
    csv = entry / "results.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:4]))  # a truncated entry
    again = cli([*TINY, "hydra.run.dir=outputs/again"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "finished before" not in again.stdout and "base 0: cache hit" in again.stdout
    rows = pd.read_csv(tmp_path / "outputs" / "again" / "results.csv")
    assert len(rows) == len(pd.read_csv(tmp_path / "outputs" / "first" / "results.csv"))


class _Payload:
    """Pickles to a call of `open(path, 'w')`: loading it with plain pickle would create the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def test_crafted_pickle_in_the_model_cache_is_never_executed(tmp_path: Path) -> None:
    first = cli(TINY, tmp_path)
    assert first.returncode == 0, first.stderr
    weights = cached_models(tmp_path)[0]
    sentinel = tmp_path / "pwned"
    with open(weights, "wb") as f:
        pickle.dump({"x": _Payload(sentinel)}, f)
    meta = json.loads(weights.with_suffix(".json").read_text())
    meta["sha256"] = file_digest(weights)  # the sidecar matches: only weights_only stands in the way
    weights.with_suffix(".json").write_text(json.dumps(meta))
    again = cli([*TINY, "agg.alpha=0.3"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not sentinel.exists()
    assert "unreadable or unsafe" in again.stdout + again.stderr and "trained in" in again.stdout
    assert torch.load(weights, weights_only=True)  # retrained and rewritten


def test_crafted_cifar_batch_is_refused_not_run(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10)
    sentinel = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Payload(sentinel), b"labels": [0]}, f)
    with pytest.raises(DataError, match="data_batch_1 is not a CIFAR batch"):
        load_dataset("cifar10", tmp_path)
    assert not sentinel.exists()


def test_real_format_cifar_still_reads_with_the_restricted_unpickler(tmp_path: Path) -> None:
    arrays = write_cifar(tmp_path, 10)
    _, train, _ = load_dataset("cifar10", tmp_path)
    assert torch.equal(train.y, torch.from_numpy(arrays["train"][1]))


def test_progress_lines_in_logs_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    proc = cli([*SMALL, "agg=np", "agg.epochs=2"], tmp_path, MERGEBENCH_LOG_EVERY="0")
    assert proc.returncode == 0, proc.stderr
    for label in ("base 0", "base 1", "NP"):
        for epoch in (1, 2):
            assert any(
                f"{label}" in ln and f"epoch {epoch}/2 loss" in ln and "img/s" in ln and "ETA" in ln
                for ln in proc.stdout.splitlines()
            ), (label, epoch, proc.stdout[-2000:])
    assert any(" lr " in ln for ln in proc.stdout.splitlines() if "base 0" in ln and "epoch 1/2" in ln)
