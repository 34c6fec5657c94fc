"""Dataset readers (placeholder being replaced by the full readers)."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mergebench.errors import DataNotFoundError
from mergebench.registry import Registry


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


@dataclasses.dataclass
class ImageData:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


Reader = Callable[[Path, bool, Path | None], tuple[ImageData, ImageData]]
DATASETS: Registry[tuple[DatasetInfo, Reader]] = Registry("dataset")
_INFO = {
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3,), (0.38,), False),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), False),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), False),
}


def _digits(root: Path, download: bool, cache: Path | None) -> tuple[ImageData, ImageData]:
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
    return ImageData(x[~test_mask].contiguous(), y[~test_mask]), ImageData(x[test_mask].contiguous(), y[test_mask])


def _idx(path: Path) -> np.ndarray:
    for p in (path, path.with_name(path.name + ".gz")):
        if p.exists():
            raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
            ndim = raw[3]
            dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
            return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    raise DataNotFoundError(f"missing {path}[.gz]; set data.root")


def _mnist_like(folder: str) -> Reader:
    def read(root: Path, download: bool, cache: Path | None) -> tuple[ImageData, ImageData]:
        raw = root / folder / "raw"
        out = []
        for split in ("train", "t10k"):
            x = torch.from_numpy(_idx(raw / f"{split}-images-idx3-ubyte").copy())[:, None]
            y = torch.from_numpy(_idx(raw / f"{split}-labels-idx1-ubyte").astype(np.int64))
            out.append(ImageData(x, y))
        return out[0], out[1]

    return read


_READERS = {"digits": _digits, "mnist": _mnist_like("MNIST"), "fashion_mnist": _mnist_like("FashionMNIST")}
for _name in _INFO:
    DATASETS.register(_name)((_INFO[_name], _READERS[_name]))


def dataset_names() -> list[str]:
    return DATASETS.names()


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name).factory[0]


def load_dataset(name: str, root: str | Path, download: bool = False, cache_dir: str | Path | None = None):
    info, reader = DATASETS.get(name).factory
    train, test = reader(Path(root), download, Path(cache_dir) if cache_dir else None)
    return info, train, test
