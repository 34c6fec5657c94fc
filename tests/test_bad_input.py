"""Every bad input is one `error:` line and exit 2 before anything runs (issue 8's sweep of bad inputs): no
traceback, no silent wrong result, and nothing trained or cached."""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mergebench import cli as cli_module
from tests.fake_data import write_idx

ROOT_USER = os.geteuid() == 0
Setup = Callable[[Path], list[str]]


def _file_as_cache(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"cache_dir={tmp / 'afile'}"]


def _read_only_cache(tmp: Path) -> list[str]:
    folder = tmp / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return [f"cache_dir={folder / 'cache'}"]


def _mnist(tmp: Path, damage: Callable[[Path], None]) -> list[str]:
    write_idx(tmp / "data", "MNIST")
    damage(tmp / "data" / "MNIST" / "raw")
    return ["dataset=mnist", f"data.root={tmp / 'data'}"]


def _truncate(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])


def _not_gzip(raw: Path) -> None:
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")


def _bad_header(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte.gz"
    payload = bytearray(gzip.decompress(path.read_bytes()))
    payload[2] = 0x0D  # float data: not the uint8 IDX MNIST has
    path.write_bytes(gzip.compress(bytes(payload)))


def _short_labels(raw: Path) -> None:
    path = raw / "train-labels-idx1-ubyte.gz"
    payload = gzip.decompress(path.read_bytes())
    n = 250
    path.write_bytes(gzip.compress(b"\0\0\x08\x01" + n.to_bytes(4, "big") + payload[8 : 8 + n]))


CASES: list[tuple[str, Setup, str]] = [
    ("eval-batch-zero", lambda t: ["eval.batch_size=0"], "eval.batch_size=0 must be > 0"),
    ("lr-negative", lambda t: ["train.lr=-1"], "train.lr=-1.0 must be > 0"),
    ("weight-decay-negative", lambda t: ["train.weight_decay=-1"], "train.weight_decay=-1.0 must be >= 0"),
    ("momentum-negative", lambda t: ["train.momentum=-1"], "train.momentum=-1.0 must be in [0, 1)"),
    ("split-seed-negative", lambda t: ["data.split_seed=-1"], "data.split_seed=-1 must be >= 0"),
    ("seed-negative", lambda t: ["seed=-3"], "seed=-3 must be an integer >= 0"),
    ("device-garbled", lambda t: ["device=cuda:abc"], "device='cuda:abc' is not known; allowed: auto, cpu"),
    ("cache-dir-is-a-file", _file_as_cache, "is a file, not a folder"),
    ("cache-dir-unwritable-fs", lambda t: ["cache_dir=/proc/mergebench-cache"], "cache_dir=/proc/mergebench-cache"),
    ("output-unwritable-fs", lambda t: ["hydra.run.dir=/proc/mergebench-out"], "hydra.run.dir=/proc/mergebench-out"),
    ("dirichlet-empty-clients", lambda t: ["data=dirichlet", "data.num_models=1000"], "get no training examples"),
    (
        "split-classes-more-clients-than-classes",
        lambda t: ["data=split_classes", "data.num_models=11"],
        "client(s) 10 get no training examples",
    ),
    (
        "late-merge-source",
        lambda t: ["-m", "data.num_models=2,3", "merge_data.source=0,5"],
        "merge_data.source=5 but data.num_models=2",
    ),
    (
        "late-classes",
        lambda t: ["-m", "data=split_classes", "data.num_models=2,3", "data.classes=[[0,1],[2,3]]"],
        "data.classes=[[0, 1], [2, 3]] must be 3 disjoint lists",
    ),
    (
        "partial-zip-pairwise",
        lambda t: ["align=zipit", "align.stop_at=h0", "strategy=pairwise", "data.num_models=4"],
        "align.stop_at (partial zipping) leaves one head per model",
    ),
    ("c2m3-iterations", lambda t: ["align=c2m3", "align.max_iter=0"], "align.max_iter=0 must be >= 1"),
    ("sweep-trailing-comma", lambda t: ["-m", "seed=0,"], "a sweep ends with a comma; list values as seed=a,b"),
    ("path-special-characters", lambda t: ["data.root=/tmp/a b(1)"], "quote a value with spaces"),
    ("path-non-ascii", lambda t: ["data.root=/tmp/données ünï"], "quote a value with spaces"),
    ("mnist-truncated-gz", lambda t: _mnist(t, _truncate), "is not a readable gzip file"),
    ("mnist-not-gzip", lambda t: _mnist(t, _not_gzip), "is not a readable gzip file"),
    ("mnist-bad-idx-header", lambda t: _mnist(t, _bad_header), "has no IDX header of uint8 data"),
    ("mnist-images-labels-differ", lambda t: _mnist(t, _short_labels), "300 images but 250 labels"),
]
if not torch.cuda.is_available():
    CASES.append(("cuda-missing", lambda t: ["device=cuda"], "device='cuda': CUDA is not available on this machine"))
if not ROOT_USER:  # root writes through permission bits; the /proc cases above cover a read-only place for root
    CASES.append(("cache-dir-read-only", _read_only_cache, "cannot write in"))


@pytest.mark.parametrize(("setup", "message"), [pytest.param(s, m, id=i) for i, s, m in CASES])
def test_bad_input_is_one_line_before_anything_runs(
    setup: Setup,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MERGEBENCH_CACHE", raising=False)
    monkeypatch.setenv("COLUMNS", "80")  # soft wrap: a long message stays one line on a narrow terminal
    args = setup(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mergebench", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    out = capsys.readouterr()
    assert exit_info.value.code == 2, out.err
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.err
    assert "Traceback" not in out.err + out.out
    assert not list(tmp_path.rglob("cache/models/*.pt")) and not (tmp_path / "outputs").exists()
