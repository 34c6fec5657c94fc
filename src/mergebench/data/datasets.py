"""Dataset readers: torchvision's on-disk layouts under `data.root` -> uint8 images [N, C, H, W] + int64 labels.

One registry entry per dataset (its facts, where its files live, how to read them), so adding a dataset is one
entry here and one YAML in conf/dataset/. Missing files raise a one-line DataNotFoundError naming the path and
how to get the data; nothing is downloaded unless `data.download=true`.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import math
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergebench.cache import atomic_write_bytes
from mergebench.errors import ConfigError, DataError, DataNotFoundError
from mergebench.registry import Registry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
DECODE_VERSION = 1  # bump when the ImageFolder decoding changes, so cached tensors are rebuilt
HOW_TO_GET = (
    "get it with data.download=true (needs `pip install mergebench[vision]`), or set data.root (env MERGEBENCH_DATA)"
    " to the folder that holds it"
)


NORMALIZE_MODES = ("standard", "unit")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset's facts. `normalize` says how uint8 pixels become inputs: `standard` = (x/255 - mean) / std, the
    CCA Merge / NP recipe; `unit` = x/255 only, Git Re-Basin's and YM's MNIST preprocessing. It is part of the info
    so that it enters every base model's cache key."""

    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    normalize: str = "standard"

    def input_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) to subtract and divide by, on the [0, 1] scale, for this info's normalisation."""
        if self.normalize == "unit":
            return (0.0,) * self.channels, (1.0,) * self.channels
        return self.mean, self.std


def with_normalize(info: DatasetInfo, mode: str) -> DatasetInfo:
    """`info` with the input normalisation `mode` (one of NORMALIZE_MODES)."""
    if mode not in NORMALIZE_MODES:
        raise ConfigError(f"dataset.normalize={mode!r} is not known; allowed: {', '.join(NORMALIZE_MODES)}")
    return dataclasses.replace(info, normalize=mode)


@dataclasses.dataclass
class ImageData:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


Split = tuple[DatasetInfo, ImageData, ImageData]


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """A dataset's facts and how to read it: `missing(root)` names the first absent file (None = all there),
    `read(root, info, cache_dir)` returns (info, train, test); `info` may be refined from the files (class count)."""

    info: DatasetInfo
    missing: Callable[[Path], Path | None]
    read: Callable[[Path, DatasetInfo, Path | None], Split]
    how_to_get: str = HOW_TO_GET


DATASETS: Registry[DatasetSource] = Registry("dataset")


def _first_missing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if not p.exists()), None)


# ---- digits: scikit-learn's bundled 8×8 digits, the embedded dataset ------------------------------------------


def _read_digits(root: Path, info: DatasetInfo, cache: Path | None) -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    gen = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_mask[idx[: round(0.2 * len(idx))]] = True
    train = ImageData(x[~test_mask].contiguous(), y[~test_mask])
    return info, train, ImageData(x[test_mask].contiguous(), y[test_mask])


# ---- MNIST, Fashion-MNIST: IDX files in <root>/<Folder>/raw, gzipped or not -----------------------------------

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_path(path: Path) -> Path | None:
    return next((p for p in (path, path.with_name(path.name + ".gz")) if p.exists()), None)


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (uint8 payload); `path` may be the raw file or lack its `.gz`. A truncated, non-gzip or
    malformed file is a one-line DataError naming it."""
    found = _idx_path(path)
    if found is None:
        raise DataNotFoundError(f"missing {path}[.gz]")
    try:
        raw = gzip.decompress(found.read_bytes()) if found.suffix == ".gz" else found.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{found} is not a readable gzip file ({err}); download it again") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(f"{found} has no IDX header of uint8 data (magic 0x0000080N); download it again")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{found} is truncated inside its IDX header; download it again")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{found} holds {len(raw)} bytes but its IDX header {dims} needs {expected}; download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_like(folder: str) -> tuple[Callable[[Path], Path | None], Callable[[Path, DatasetInfo, Path | None], Split]]:
    def missing(root: Path) -> Path | None:
        return next(
            (root / folder / "raw" / f for f in IDX_FILES if _idx_path(root / folder / "raw" / f) is None), None
        )

    def read(root: Path, info: DatasetInfo, cache: Path | None) -> Split:
        raw = root / folder / "raw"
        out = []
        for split in ("train", "t10k"):
            x = torch.from_numpy(read_idx(raw / f"{split}-images-idx3-ubyte").copy())[:, None]
            y = torch.from_numpy(read_idx(raw / f"{split}-labels-idx1-ubyte").astype(np.int64))
            _check_pair(raw / f"{split}-*-idx?-ubyte", x, y)
            out.append(ImageData(x, y))
        return info, out[0], out[1]

    return missing, read


# ---- CIFAR-10/100: python pickle batches (dicts with b'data' uint8 [N, 3072] and the labels) -------------------


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickled dicts of lists, bytes and numpy arrays: exactly those globals are allowed, so a
    crafted batch file cannot run code."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    })  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(f"{path} is not a CIFAR batch ({err}); download it again") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch (a {type(batch).__name__}, not a dict); download it again")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _check_pair(path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels; download the files again")


def _cifar(
    folder: str, train_files: tuple[str, ...], test_file: str, label_key: str
) -> tuple[Callable[[Path], Path | None], Callable[[Path, DatasetInfo, Path | None], Split]]:
    def missing(root: Path) -> Path | None:
        return _first_missing([root / folder / f for f in (*train_files, test_file)])

    def load(paths: list[Path]) -> ImageData:
        batches = [_unpickle(p) for p in paths]
        try:
            x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
            y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{paths[0].parent}: malformed CIFAR batch ({err}); download it again") from None
        data = ImageData(torch.from_numpy(x.copy()), torch.from_numpy(y))
        _check_pair(paths[0].parent, data.x, data.y)
        return data

    def read(root: Path, info: DatasetInfo, cache: Path | None) -> Split:
        base = root / folder
        return info, load([base / f for f in train_files]), load([base / test_file])

    return missing, read


# ---- USPS: torchvision's usps.bz2 / usps.t.bz2, lines "label idx:value ..." with values in [-1, 1] -----------

USPS_FILES = ("usps.bz2", "usps.t.bz2")


def read_usps(path: Path) -> ImageData:
    """16×16 images; values mapped to uint8 as torchvision does, ((v + 1) / 2 · 255) truncated; labels 1..10 -> 0..9."""
    with bz2.open(path, "rt") as f:
        rows = [line.split() for line in f if line.strip()]
    values = np.asarray([[item.split(":")[-1] for item in row[1:]] for row in rows], dtype=np.float32)
    x = ((values.reshape(-1, 1, 16, 16) + 1) / 2 * 255).astype(np.uint8)
    y = np.asarray([int(float(row[0])) - 1 for row in rows], dtype=np.int64)
    return ImageData(torch.from_numpy(x), torch.from_numpy(y))


def _usps_missing(root: Path) -> Path | None:
    return _first_missing([root / f for f in USPS_FILES])


def _read_usps(root: Path, info: DatasetInfo, cache: Path | None) -> Split:
    return info, read_usps(root / USPS_FILES[0]), read_usps(root / USPS_FILES[1])


# ---- ImageNet-200: ImageFolder train/<class>/**, val/<class>/** (or Tiny ImageNet's val_annotations.txt) -----

IMAGENET_FOLDERS = ("imagenet200", "tiny-imagenet-200")


def _imagenet_base(root: Path) -> Path | None:
    return next((root / f for f in IMAGENET_FOLDERS if (root / f / "train").is_dir()), None)


def _imagenet_missing(root: Path) -> Path | None:
    base = _imagenet_base(root)
    if base is None:
        return root / IMAGENET_FOLDERS[0] / "train"
    return None if (base / "val").is_dir() else base / "val"


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _labelled_files(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, label) pairs in a deterministic order: class folders, or Tiny ImageNet's flat val/images + annotations."""
    index = {c: i for i, c in enumerate(classes)}
    annotations = split_dir / "val_annotations.txt"
    if annotations.exists():
        wnid = dict(line.split("\t")[:2] for line in annotations.read_text().splitlines() if line.strip())
        pairs = [(p, wnid.get(p.name)) for p in _images_under(split_dir / "images")]
    else:
        pairs = [(p, c.name) for c in sorted(d for d in split_dir.iterdir() if d.is_dir()) for p in _images_under(c)]
    unknown = sorted({str(c) for _, c in pairs if c not in index})
    if unknown:
        raise ConfigError(f"{split_dir} has classes not in the train folder: {', '.join(unknown[:5])}")
    return [(p, index[c]) for p, c in pairs]


def _decode(files: list[tuple[Path, int]], size: int, label: str) -> ImageData:
    from PIL import Image

    from mergebench.progress import progress_bar

    x = np.empty((len(files), size, size, 3), dtype=np.uint8)
    with progress_bar() as progress:
        task = progress.add_task(f"decoding {label}", total=len(files), status="")
        for i, (path, _) in enumerate(files):
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                x[i] = np.asarray(rgb)
            progress.advance(task)
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageData(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y)


def _fingerprint(files: list[tuple[Path, int]], size: int) -> str:
    """Changes when any image file is added, removed, renamed, relabelled or rewritten."""
    h = hashlib.sha256(f"{DECODE_VERSION} {size}".encode())
    for path, label in files:
        stat = path.stat()
        h.update(f"{path} {label} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _read_imagenet(root: Path, info: DatasetInfo, cache: Path | None) -> Split:
    """Decoded once with PIL (resized to info.size when needed) into a uint8 tensor file under the cache dir."""
    base = _imagenet_base(root)
    assert base is not None  # checked by `missing` before reading
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
    files = {split: _labelled_files(base / split, classes) for split in ("train", "val")}
    info = dataclasses.replace(info, num_classes=len(classes))
    key = _fingerprint(files["train"] + files["val"], info.size)
    cached = cache / f"{info.name}-{key}.pt" if cache is not None else None
    if cached is not None and cached.exists():
        try:
            state = torch.load(cached, map_location="cpu", weights_only=True)
            return info, ImageData(state["train_x"], state["train_y"]), ImageData(state["val_x"], state["val_y"])
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError):
            pass  # a damaged cache file is decoded again and overwritten
    train, val = (_decode(files[s], info.size, f"{info.name} {s}") for s in ("train", "val"))
    if cached is not None:
        state = {"train_x": train.x, "train_y": train.y, "val_x": val.x, "val_y": val.y}
        atomic_write_bytes(cached, lambda f: torch.save(state, f))
    return info, train, val


# ---- the registry ---------------------------------------------------------------------------------------------

_mnist_missing, _mnist_read = _mnist_like("MNIST")
_fmnist_missing, _fmnist_read = _mnist_like("FashionMNIST")
_c10_missing, _c10_read = _cifar(
    "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels"
)
_c100_missing, _c100_read = _cifar("cifar-100-python", ("train",), "test", "fine_labels")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_SOURCES = [
    DatasetSource(DatasetInfo("digits", 10, 1, 8, (0.3,), (0.38,), False), lambda root: None, _read_digits),
    DatasetSource(DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), False), _mnist_missing, _mnist_read),
    DatasetSource(DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), False), _fmnist_missing, _fmnist_read),
    DatasetSource(
        DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
        _c10_missing,
        _c10_read,
    ),
    DatasetSource(
        DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
        _c100_missing,
        _c100_read,
    ),
    DatasetSource(DatasetInfo("usps", 10, 1, 16, (0.2469,), (0.2989,), False), _usps_missing, _read_usps),
    DatasetSource(
        DatasetInfo("imagenet200", 200, 3, 64, *IMAGENET_STATS, True),
        _imagenet_missing,
        _read_imagenet,
        "data.download=true fetches Tiny ImageNet-200 (needs `pip install mergebench[vision]`), or point data.root"
        " at a folder holding imagenet200/{train,val}/<class>/*",
    ),
]
for _source in _SOURCES:
    DATASETS.register(_source.info.name)(_source)


def dataset_names() -> list[str]:
    return DATASETS.names()


def missing_data_error(name: str, root: Path, path: Path) -> DataNotFoundError:
    source = DATASETS.get(name).factory
    return DataNotFoundError(f"dataset={name}: {path} not found under data.root={root}; {source.how_to_get}")


def check_available(name: str, root: str | Path, download: bool = False) -> None:
    """Fail fast, before any training, when a dataset's files are absent and cannot be fetched."""
    from mergebench.data.download import can_download

    root = Path(root)
    path = DATASETS.get(name).factory.missing(root)
    if path is None:
        return
    if not download:
        raise missing_data_error(name, root, path)
    problem = can_download(name)
    if problem is not None:
        raise DataNotFoundError(f"dataset={name}: {path} not found and data.download=true {problem}")


def load_dataset(name: str, root: str | Path, download: bool = False, cache_dir: str | Path | None = None) -> Split:
    """(info, train, test) of a dataset; fetches it through torchvision first when allowed and absent."""
    from mergebench.data.download import download_dataset

    source = DATASETS.get(name).factory
    root = Path(root)
    check_available(name, root, download)
    if source.missing(root) is not None:
        download_dataset(name, root)
        path = source.missing(root)
        if path is not None:
            raise missing_data_error(name, root, path)
    return source.read(root, source.info, Path(cache_dir) if cache_dir else None)
