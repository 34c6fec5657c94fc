"""Every bad checkpoint is one line saying what the file is: not a checkpoint at all (told by its first bytes, not
its name), empty, truncated or corrupt, a pickle that would run code, or weights of another architecture; and a
good one loads whatever it is named."""

from __future__ import annotations

import io
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mergebench import cli as cli_module
from mergebench.checkpoints import CheckpointError, checkpoint_paths, load_models, read_state
from mergebench.errors import ConfigError

STATE = {"weight": torch.arange(6.0).view(2, 3), "bias": torch.zeros(2)}  # an nn.Linear(3, 2)'s state dict


def torch_bytes(obj: object = STATE, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def safetensors_bytes(tmp: Path) -> bytes:
    save_file(STATE, str(tmp / "scratch.safetensors"))
    return (tmp / "scratch.safetensors").read_bytes()


def scripted() -> bytes:
    """A TorchScript archive (torch.jit.save): a zip like torch.save's, holding code."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, and still handed around
        torch.jit.save(torch.jit.script(nn.Linear(3, 2)), buffer)
    return buffer.getvalue()


def with_data_pkl(archive: bytes, data_pkl: bytes) -> bytes:
    """A torch zip file whose data.pkl is replaced: the archive reads, its pickle does not."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else source.read(info))
    return out.getvalue()


def zip_of(names: list[str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in names:
            archive.writestr(name, b"0")
    return out.getvalue()


class Payload:
    """Unpickling this would call Path.touch: code a checkpoint must never run."""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path("never-created"),))


Content = Callable[[Path], bytes]
BAD: list[tuple[str, str, Content, str]] = [
    (
        "text",
        "notes.txt",
        lambda t: b"some notes\nlr 0.1, 40 epochs\n",  # torch.load: IndexError
        r"is a text file \(starting 'some notes'\)",
    ),
    (
        "text-named-pt",
        "notes.pt",
        lambda t: b"lr 0.1\n",
        r"is a text file \(starting 'lr 0.1'\), not a torch or safetensors",
    ),
    (
        "png-named-pt",
        "photo.pt",
        lambda t: b"\x89PNG\r\n\x1a\n" + bytes(64),
        r"is a PNG image, not a torch or safetensors",
    ),
    ("npy", "weights.pt", lambda t: b"\x93NUMPY\x01\x00" + bytes(64), r"is a NumPy .npy array"),
    (
        "binary",
        "blob.pt",
        lambda t: bytes([0, 1, 2, 3, 250, 251, 0, 9]),
        r"is unrecognised data \(first bytes 00 01 02 03",
    ),
    ("empty", "empty.pt", lambda t: b"", r"is an empty file \(0 bytes\)"),
    (
        "plain-pickle",
        "state.pkl",
        lambda t: pickle.dumps({"weight": [1.0]}),
        r"is a Python pickle not written by torch.save",
    ),
    (
        "zip-not-torch",
        "arrays.pt",
        lambda t: zip_of(["a.npy", "b.npy"]),
        r"is a zip archive of a.npy, b.npy without torch's data.pkl",
    ),
    (
        "truncated-zip",
        "cut.pt",
        lambda t: torch_bytes()[:700],
        r"is a truncated or corrupt torch file: a zip archive whose directory",
    ),
    (
        "truncated-legacy",
        "cut_legacy.pt",
        lambda t: torch_bytes(legacy=True)[:200],
        r"is a truncated or corrupt torch file \(",
    ),
    (
        "corrupt-pickle",
        "damaged.pt",
        lambda t: with_data_pkl(torch_bytes(), b"\x80\x02\xff."),
        r"is a corrupt torch file: its pickle does not parse \(Unsupported operand 255\)",
    ),
    (
        "truncated-safetensors-header",
        "cut.safetensors",
        lambda t: safetensors_bytes(t)[:20],
        r"is a truncated safetensors file: its header alone is \d+ bytes, the file 20",
    ),
    (
        "truncated-safetensors-data",
        "short.safetensors",
        lambda t: safetensors_bytes(t)[:-8],
        r"is a truncated or corrupt safetensors file \(",
    ),
    (
        "code-pickle",
        "evil.pt",
        lambda t: torch_bytes({"weight": Payload()}),
        r"evil.pt refused: loading it would run code \(it needs getattr;",
    ),
    (
        "whole-module",
        "module.pt",
        lambda t: torch_bytes(nn.Linear(3, 2)),
        r"refused: loading it would run code \(it needs torch.nn.modules.linear.Linear",
    ),
    (
        "torchscript",
        "scripted.pt",
        lambda t: scripted(),
        r"is a TorchScript archive \(torch.jit.save\), not a state dict",
    ),
    (
        "not-a-state-dict",
        "list.pt",
        lambda t: torch_bytes([torch.zeros(2)]),
        r"holds a list, not a state dict \(names -> tensors\)",
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), [pytest.param(n, c, m, id=i) for i, n, c, m in BAD])
def test_every_bad_checkpoint_is_one_line_saying_what_the_file_is(
    name: str, content: Content, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a pickle that ran would create its file
    path = tmp_path / name
    path.write_bytes(content(tmp_path))
    with pytest.raises(CheckpointError, match=message) as err:
        read_state(path)
    text = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in text and text.startswith(f"checkpoint {path} ")
    assert ("would run code" in text) == ("refused" in message)  # never the diagnosis of a file that is no pickle
    assert not (tmp_path / "never-created").exists()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("b.pt", safetensors_bytes),  # a safetensors file with a .pt name
        ("a.safetensors", lambda t: torch_bytes()),  # a torch.save zip named .safetensors
        ("legacy.pt", lambda t: torch_bytes(legacy=True)),  # the pre-1.6 pickle format
        ("trained.ckpt", lambda t: torch_bytes({"state_dict": STATE, "epoch": 3})),  # a training checkpoint
    ],
)
def test_a_good_checkpoint_loads_whatever_its_name(name: str, content: Content, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content(tmp_path))
    state = read_state(path)
    assert state.keys() == STATE.keys() and all(torch.equal(state[k], v) for k, v in STATE.items())


def test_a_file_that_is_no_checkpoint_stops_the_config_before_anything_runs(tmp_path: Path) -> None:
    good, notes = tmp_path / "good.pt", tmp_path / "notes.txt"
    good.write_bytes(torch_bytes())
    notes.write_text("not weights\n")
    assert checkpoint_paths([str(good), str(good)]) == [good, good]
    with pytest.raises(CheckpointError, match=r"notes.txt is a text file \(starting 'not weights'\)"):
        checkpoint_paths([str(good), str(notes)])


def test_cli_prints_one_line_for_a_text_file_passed_as_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good, notes = tmp_path / "good.pt", tmp_path / "notes.pt"
    good.write_bytes(torch_bytes())
    notes.write_text("see the wiki\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MERGEBENCH_CACHE", raising=False)
    monkeypatch.setattr(sys, "argv", ["mergebench", f"checkpoints=[{good},{notes}]"])
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    out = capsys.readouterr()
    lines = [line for line in out.err.strip().splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, out.err
    assert lines[0].startswith("error: ") and "notes.pt is a text file" in lines[0], out.err
    assert "Traceback" not in out.err + out.out and not (tmp_path / "outputs").exists()


def test_weights_of_another_architecture_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    path.write_bytes(torch_bytes(nn.Linear(5, 2).state_dict()))
    with pytest.raises(
        CheckpointError, match=r"wide.pt does not fit Linear: shape: weight \[2, 5\] \(model: \[2, 3\]\)"
    ):
        load_models([path], lambda: nn.Linear(3, 2))
