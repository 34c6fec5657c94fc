"""A content-addressed, lock-protected cache of trained base models.

Keys hash everything that determines a model. Writes go to a temporary file and are renamed into place, and
a sidecar records the file's SHA-256, so a run killed mid-write or a corrupted file is retrained, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock


def content_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


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
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError, json.JSONDecodeError):
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
