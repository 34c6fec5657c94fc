"""Merging the user's own weights: `checkpoints=[a.pt,b.safetensors,...]` replaces base-model training.

Each file is a state dict, read by what it holds, never by its name: a torch.save file (a zip archive, or the legacy
pickle format) through `torch.load(weights_only=True)`, which refuses a pickle that needs code to load (it is never
executed); a safetensors file through the safetensors package. Every bad file stops the run with one line saying
what it is: not a checkpoint at all (a text file, an image, a plain pickle; told apart by their first bytes, checked
when the config is validated), empty, truncated or corrupt, a pickle that would run code, or a state dict whose keys
or shapes do not fit the architecture.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergebench.errors import ConfigError

SHOWN = 4  # mismatches listed in the one-line error
SAVE_HINT = "save a state dict with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
HEAD = 512  # bytes read to tell what a file is
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive holding <name>/data.pkl
LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]  # what legacy torch.save writes first
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors package's own bound on its JSON header
# what users hand over by mistake, by their first bytes
OTHER_FORMATS = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "gzip-compressed data",
    b"\x89HDF\r\n\x1a\n": "an HDF5 file (Keras .h5?)",
    b"\x93NUMPY": "a NumPy .npy array",
}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded safely, or does not fit the architecture."""


def _first_line(text: object) -> str:
    return (str(text).strip().splitlines() or [""])[0]


def _text_start(head: bytes) -> str | None:
    """The first line of `head` where it reads as UTF-8 text (a multi-byte character cut at its end aside)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:
            return None
        text = head[: err.start].decode("utf-8")
    if any(c < " " and c not in "\t\n\r\f" for c in text):
        return None
    return _first_line(text)[:40]


def _what(head: bytes) -> str:
    """What a file that is no checkpoint is, from its first bytes."""
    if not head:
        return "an empty file (0 bytes)"
    known = next((name for magic, name in OTHER_FORMATS.items() if head.startswith(magic)), None)
    if known is not None:
        return known
    if head[:1] == b"\x80":  # a pickle's protocol opcode, without legacy torch.save's magic number after it
        return "a Python pickle not written by torch.save"
    text = _text_start(head)
    if text is not None:
        return f"a text file (starting {text!r})"
    return f"unrecognised data (first bytes {head[:8].hex(' ')})"


def _check_zip(path: Path, size: int) -> None:
    """A zip archive is a torch checkpoint where its directory reads and it holds a data.pkl but no TorchScript
    constants.pkl (torch.load refuses a TorchScript archive with weights_only=True)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as err:
        raise CheckpointError(
            f"checkpoint {path} is a truncated or corrupt torch file: a zip archive whose directory cannot be read "
            f"({size} bytes; {err}); save or copy it again"
        ) from None
    if any(name.rpartition("/")[2] == "constants.pkl" for name in names):
        raise CheckpointError(
            f"checkpoint {path} is a TorchScript archive (torch.jit.save), not a state dict: {SAVE_HINT}"
        )
    if not any(name.rpartition("/")[2] == "data.pkl" for name in names):
        shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
        raise CheckpointError(
            f"checkpoint {path} is a zip archive of {shown or 'nothing'} without torch's data.pkl, not a torch or "
            f"safetensors file: {SAVE_HINT}"
        )


def _safetensors_header(head: bytes, size: int, path: Path) -> bool:
    """Whether `head` opens a safetensors file (an 8-byte little-endian header length, then its JSON); a header
    longer than the file is a truncated one."""
    length = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or length > SAFETENSORS_MAX_HEADER:
        return False
    if 8 + length > size:
        raise CheckpointError(
            f"checkpoint {path} is a truncated safetensors file: its header alone is {length} bytes, the file "
            f"{size}; save or copy it again"
        )
    return True


def sniff(path: Path) -> str:
    """The reader a file needs ('torch' or 'safetensors'), from its first bytes: a file of any other kind, empty,
    or whose zip directory or safetensors header is cut short stops here with one line saying what it is."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(HEAD)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err.strerror or err}") from None
    if head.startswith(ZIP_MAGIC):
        _check_zip(path, size)
        return "torch"
    if head.startswith(LEGACY_MAGIC):
        return "torch"
    if _safetensors_header(head, size, path):
        return "safetensors"
    raise CheckpointError(f"checkpoint {path} is {_what(head)}, not a torch or safetensors file: {SAVE_HINT}")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise CheckpointError(
            f"checkpoint {path} is a truncated or corrupt safetensors file ({_first_line(err)}); save or copy it again"
        ) from None


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        with path.open("rb") as f:  # a file object: torch.load would read a path named *.safetensors as one
            obj: Any = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message: "Weights only load failed. ... WeightsUnpickler error: <reason>\n\n<advice>"
        reason = _first_line(str(err).rpartition("WeightsUnpickler error:")[2]) or _first_line(err)
        code = re.search(r"GLOBAL (\S+)|allowlisted.*? got <class '([^']+)'>", str(err), flags=re.DOTALL)
        if code is None:  # an opcode or a length the unpickler cannot take: the bytes are damaged
            raise CheckpointError(
                f"checkpoint {path} is a corrupt torch file: its pickle does not parse ({reason}); save or copy it "
                "again"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} refused: loading it would run code (it needs {code.group(1) or code.group(2)}; "
            f"read with torch.load weights_only=True); {SAVE_HINT}"
        ) from None
    except Exception as err:  # anything else torch.load meets in a file that opens like a checkpoint: damage
        raise CheckpointError(
            f"checkpoint {path} is a truncated or corrupt torch file "
            f"({': '.join(filter(None, (type(err).__name__, _first_line(err))))}); save or copy it again"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a training checkpoint ({"state_dict": ..., "epoch": ...})
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict (names -> tensors): {SAVE_HINT}"
        )
    return dict(obj)


READERS: dict[str, Callable[[Path], dict[str, Tensor]]] = {"torch": _read_torch, "safetensors": _read_safetensors}


def read_state(path: Path) -> dict[str, Tensor]:
    """The state dict in `path`, read as what its first bytes say it is (a safetensors file named .pt loads)."""
    return READERS[sniff(path)](path)


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


def load_state(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """`model.load_state_dict(state)`, with the model's own version metadata where `state` was built fresh (a merged
    or permuted dict, a safetensors file): modules that read their version while loading (torchvision's MNASNet)
    refuse a state without it."""
    if getattr(state, "_metadata", None) is None:
        fresh = OrderedDict(state)
        fresh._metadata = getattr(model.state_dict(), "_metadata", None)
        state = fresh
    model.load_state_dict(state)
    return model


def load_models(paths: list[Path], build: Callable[[], nn.Module]) -> list[tuple[nn.Module, dict[str, Any]]]:
    """One model per checkpoint, in eval mode, with its load time (the rows' wall_s for a base model)."""
    models = []
    for path in paths:
        start = time.perf_counter()
        model = build()
        state = read_state(path)
        check_fits(state, model, path)
        load_state(model, state)
        models.append((model.eval(), {"checkpoint": str(path), "wall_s": time.perf_counter() - start}))
    return models


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_paths(value: Any) -> list[Path]:
    """The `checkpoints` key: null, or a list of at least two existing files that open like checkpoints."""
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
        sniff(path)  # a file that is no checkpoint at all stops the run before anything else
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
