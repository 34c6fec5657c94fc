"""Small datasets written in the real on-disk formats (CIFAR pickles, ImageFolder PNGs, USPS bz2, IDX), so
presets that need CIFAR, ImageNet-200 or USPS run end to end here."""

from __future__ import annotations

import bz2
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_cifar(root: Path, classes: int, n_train: int = 200, n_test: int = 100, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    key = b"labels" if classes == 10 else b"fine_labels"
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = (np.arange(n) % classes).tolist()
        # class-dependent brightness so a model can learn something
        data = rng.integers(0, 64, (n, 3072), dtype=np.uint8) + (np.array(labels)[:, None] * (190 // classes))
        return {b"data": data.astype(np.uint8), key: labels}

    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    for name in names:
        with open(folder / name, "wb") as f:
            pickle.dump(batch(n_train // len(names)), f)
    with open(folder / ("test_batch" if classes == 10 else "test"), "wb") as f:
        pickle.dump(batch(n_test), f)


def write_imagefolder(root: Path, classes: int = 4, per_class: int = 6, size: int = 64) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / "imagenet200" / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.png")


def write_usps(root: Path, n_train: int = 100, n_test: int = 50) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("usps.bz2", n_train), ("usps.t.bz2", n_test)):
        lines = []
        for i in range(n):
            values = rng.uniform(-1, 1, 256)
            lines.append(f"{i % 10 + 1} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(values)))
        (root / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))


def write_idx(root: Path, folder: str, n_train: int = 300, n_test: int = 100) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        )
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 0x801, n) + labels.tobytes()))


def write_all(root: Path) -> Path:
    write_cifar(root, 10)
    write_cifar(root, 100, n_train=400, n_test=200)
    write_imagefolder(root)
    write_usps(root)
    write_idx(root, "MNIST")
    write_idx(root, "FashionMNIST")
    return root
