"""Merging the user's own weights: `checkpoints=[a.pt,b.safetensors,...]` replaces base-model training.

Each file is a state dict: `.safetensors` through the safetensors package, anything else through
`torch.load(weights_only=True)`, which refuses a pickle that needs code to load (it is never executed). A file
whose keys or shapes do not fit the architecture stops the run with one line listing the first mismatches.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergebench.errors import ConfigError

SHOWN = 4  # mismatches listed in the one-line error


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded safely, or does not fit the architecture."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file: {_first_line(err)}") from None


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        needs = f"it needs {reason.group(1)}" if reason else _first_line(err)
        raise CheckpointError(
            f"checkpoint {path} refused: loading it would run code ({needs}; read with torch.load weights_only=True); "
            "save a state dict (torch.save(model.state_dict(), path)) or a .safetensors file"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path}: not a readable torch file: {_first_line(err)}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a training checkpoint ({"state_dict": ..., "epoch": ...})
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path}: expected a state dict (names -> tensors), found {type(obj).__name__}"
        )
    return dict(obj)


READERS: dict[str, Callable[[Path], dict[str, Tensor]]] = {".safetensors": _read_safetensors}


def read_state(path: Path) -> dict[str, Tensor]:
    return READERS.get(path.suffix, _read_torch)(path)


def check_fits(state: Mapping[str, Tensor], model: nn.Module, path: Path) -> None:
    """One line naming the first missing keys, unexpected keys and shape mismatches, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} (model: {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
            problems.append(f"{label}: {', '.join(items[:SHOWN])}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)}")


def load_models(paths: list[Path], build: Callable[[], nn.Module]) -> list[tuple[nn.Module, dict[str, Any]]]:
    """One model per checkpoint, in eval mode, with its load time (the rows' wall_s for a base model)."""
    models = []
    for path in paths:
        start = time.perf_counter()
        model = build()
        state = read_state(path)
        check_fits(state, model, path)
        model.load_state_dict(state)
        models.append((model.eval(), {"checkpoint": str(path), "wall_s": time.perf_counter() - start}))
    return models


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_paths(value: Any) -> list[Path]:
    """The `checkpoints` key: null, or a list of at least two existing files."""
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"checkpoints={value!r} must be a list of files, e.g. checkpoints=[a.pt,b.safetensors]")
    paths = [Path(v).expanduser().resolve() for v in value]
    if len(paths) < 2:
        raise ConfigError(f"checkpoints={value} must name at least two files (merging needs two models)")
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"checkpoints: {path} is not a file")
    return paths


def checkpoint_key(paths: list[Path]) -> list[dict[str, str]]:
    """What the results cache keys on: each file's path and content, so a re-saved checkpoint is merged anew."""
    return [{"path": str(p), "sha256": file_digest(p)} for p in paths]


def check_sources(model: str, checkpoints: list[Path], joint: bool) -> None:
    """A custom architecture needs its weights; with checkpoints nothing is trained, so no joint reference."""
    if model == "custom" and not checkpoints:
        raise ConfigError("model=custom needs checkpoints=[a.pt,b.safetensors,...]: custom models are not trained here")
    if checkpoints and joint:
        raise ConfigError(
            "references.joint=true trains a model on the union; with checkpoints=[...] nothing is trained"
        )
