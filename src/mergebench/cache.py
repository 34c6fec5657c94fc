"""A content-addressed, lock-protected cache of trained base models.

Keys hash everything that determines a model. Writes go to a temporary file and are renamed into place, and
a sidecar records the file's SHA-256, so a run killed mid-write or a corrupted file is retrained, never loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

log = logging.getLogger("mergebench")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def content_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


@functools.cache
def code_digest() -> str:
    """A digest of the package's own source files: a finished run's results are reused only by the code that made
    them, so a fix changes the numbers it fixes instead of restoring old ones (base models keep their own
    TRAINER_VERSION: a code change elsewhere does not retrain them)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write through `write(fileobj)` into a temp file in the same folder, fsync, then rename into place.

    The file gets the usual umask permissions (mkstemp's 0600 would hide results from the rest of a group).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "models"

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        return self.root / f"{key}.pt", self.root / f"{key}.json", self.root / f"{key}.lock"

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The cached state dict and its metadata, or None when absent, partial or corrupted."""
        weights, meta_path, _ = self.paths(key)
        if not (weights.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != file_digest(weights):
                return None
        except (OSError, ValueError):
            return None
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but tensors: never executed, retrained
            log.warning(
                "warning: cached model %s is unreadable or unsafe (%s): retraining it", weights, _first_line(err)
            )
            return None
        return state, meta

    def get_or_create(
        self, key: str, create: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
        """Return (state, meta, hit). Concurrent callers with the same key train once: the rest wait on the lock."""
        weights, meta_path, lock = self.paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            cached = self.load(key)
            if cached is not None:
                return cached[0], cached[1], True
            state, meta = create()
            atomic_write_bytes(weights, lambda f: torch.save(state, f))
            meta = {**meta, "sha256": file_digest(weights)}
            atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str))
            return state, meta, False


class ResultsCache:
    """Finished runs, keyed by the resolved config, the content of the data they read and the code's digest.

    An entry is a folder holding every file the run wrote (rows, split, artifacts) and a manifest of their
    digests and the row count, written last: a reused job's folder is as complete as a fresh one, and an entry
    that was truncated or tampered with is ignored (and recomputed), never reused.
    """

    MANIFEST = "manifest.json"

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "results"

    def restore(self, key: str, out_dir: Path) -> int | None:
        """Copy a valid entry's files into `out_dir`; returns its row count, or None when there is none."""
        entry = self.root / key
        try:
            manifest = json.loads((entry / self.MANIFEST).read_text())
            contents = {name: (entry / name).read_bytes() for name in manifest["files"]}
            rows = int(manifest["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if any(_digest(data) != manifest["files"][name] for name, data in contents.items()):
            return None
        if contents.get("results.csv", b"").count(b"\n") != rows + 1:
            return None
        for name, data in contents.items():
            atomic_write_bytes(out_dir / name, lambda f, data=data: f.write(data))
        return rows

    def store(self, key: str, out_dir: Path, rows: int) -> None:
        """Snapshot the run's files (everything but Hydra's own folder and logs) as the entry for `key`."""
        contents = {
            p.name: p.read_bytes()
            for p in sorted(out_dir.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix != ".log"
        }
        entry = self.root / key
        for name, data in contents.items():
            atomic_write_bytes(entry / name, lambda f, data=data: f.write(data))
        manifest = {"rows": rows, "files": {name: _digest(data) for name, data in contents.items()}}
        atomic_write_text(entry / self.MANIFEST, json.dumps(manifest, indent=1))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
