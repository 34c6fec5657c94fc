"""The base-model cache: hit after miss, corruption detected and retrained, concurrent callers train once."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from mergebench.cache import ModelCache, atomic_write_text


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), value)}


def test_hit_after_miss(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    calls = []

    def create():
        calls.append(1)
        return _state(1.0), {"wall_s": 0.1}

    state, meta, hit = cache.get_or_create("k1", create)
    assert not hit and calls == [1]
    state2, meta2, hit2 = cache.get_or_create("k1", create)
    assert hit2 and calls == [1]
    assert torch.equal(state2["w"], state["w"]) and meta2["sha256"] == meta["sha256"]


def test_corrupted_or_partial_file_is_retrained(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    cache.get_or_create("k", lambda: (_state(1.0), {}))
    weights, meta, _ = cache.paths("k")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert cache.load("k") is None
    state, _, hit = cache.get_or_create("k", lambda: (_state(2.0), {}))
    assert not hit and state["w"][0, 0] == 2.0
    meta.unlink()  # a run killed between the weights and the sidecar
    assert cache.load("k") is None
    weights.write_bytes(b"")
    assert cache.get_or_create("k", lambda: (_state(3.0), {}))[2] is False


def _worker(root: str, out: str) -> None:
    import time

    def create():
        Path(out).with_suffix(f".{mp.current_process().pid}").write_text("trained")
        time.sleep(0.5)
        return _state(5.0), {}

    ModelCache(Path(root)).get_or_create("shared", create)


def test_concurrent_processes_train_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(tmp_path / "mark"))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(list(tmp_path.glob("mark.*"))) == 1
    assert not list((tmp_path / "cache" / "models").glob("*.tmp"))


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    """Results written for a team must be readable by it: not mkstemp's private 0600."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "results.csv", "a,b\n1,2\n")
    finally:
        os.umask(old)
    assert (tmp_path / "results.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "results.csv").read_text() == "a,b\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_finished_run_is_reused_only_by_the_code_that_made_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results cache's key holds the package's source digest: after a code change (here: a different digest)
    the run is merged again, not restored; the base models stay cached."""
    from hydra import compose, initialize_config_dir

    from mergebench import run as run_module
    from mergebench.cli import CONF_DIR
    from mergebench.config import validate

    overrides = ["model.hidden=[16]", "train.epochs=1", f"cache_dir={tmp_path / 'cache'}", "align=permute"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = validate(compose("config", overrides=overrides))
    merges: list[str] = []
    real = run_module.merge_and_evaluate
    monkeypatch.setattr(run_module, "merge_and_evaluate", lambda *a: merges.append("merged") or real(*a))
    run_module.run(cfg, tmp_path / "first")
    run_module.run(cfg, tmp_path / "same_code")
    assert merges == ["merged"]
    monkeypatch.setattr(run_module, "code_digest", lambda: "another version")
    changed = run_module.run(cfg, tmp_path / "changed_code")
    assert merges == ["merged", "merged"] and len(changed) > 0
