"""Small datasets written in the real on-disk formats (CIFAR pickles, ImageFolder PNGs, USPS bz2, IDX), so readers
can be tested against them and presets that need CIFAR, ImageNet-200 or USPS run end to end here.

Each writer returns what it wrote, as {split: (uint8 images [N, C, H, W], int64 labels)}, for round-trip checks.
"""

from __future__ import annotations

import bz2
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def write_cifar(root: Path, classes: int, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    key = b"labels" if classes == 10 else b"fine_labels"
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = (rng.permutation(n) % classes).tolist()
        # class-dependent brightness so a model can learn something
        data = rng.integers(0, 64, (n, 3072), dtype=np.uint8) + (np.array(labels)[:, None] * (190 // classes))
        return {b"data": data.astype(np.uint8), key: labels}

    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    written: dict[str, list[dict]] = {"train": [], "test": []}
    for split, files, n in (
        ("train", names, n_train // len(names)),
        ("test", ["test_batch" if classes == 10 else "test"], n_test),
    ):
        for name in files:
            b = batch(n)
            if classes == 100:
                b[b"coarse_labels"] = [label // 5 for label in b[key]]
            with open(folder / name, "wb") as f:
                pickle.dump(b, f)
            written[split].append(b)
    return {
        split: (
            np.concatenate([b[b"data"] for b in bs]).reshape(-1, 3, 32, 32),
            np.concatenate([np.asarray(b[key], dtype=np.int64) for b in bs]),
        )
        for split, bs in written.items()
    }


def write_imagefolder(
    root: Path, classes: int = 4, per_class: int = 6, size: int = 64, folder: str = "imagenet200"
) -> Arrays:
    """train/<class>/*.png and val/<class>/*.png; labels follow the sorted class-folder names (ImageFolder)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out: Arrays = {}
    for split in ("train", "val"):
        xs, ys = [], []
        for c in range(classes):
            target = root / folder / split / f"n{c:08d}"
            target.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(target / f"img_{i}.png")
                xs.append(pixels.transpose(2, 0, 1))
                ys.append(c)
        out[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    return out


def write_usps(root: Path, n_train: int = 100, n_test: int = 50) -> Arrays:
    """torchvision's usps.bz2 / usps.t.bz2: "label idx:value ..." lines, labels 1..10, values in [-1, 1]."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out: Arrays = {}
    for split, name, n in (("train", "usps.bz2", n_train), ("test", "usps.t.bz2", n_test)):
        values = np.round(rng.uniform(-1, 1, (n, 256)), 6)
        values[:, 0], values[:, -1] = -1.0, 1.0
        labels = np.arange(n) % 10
        lines = [f"{labels[i] + 1} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(values[i])) for i in range(n)]
        (root / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        pixels = ((values.astype(np.float32) + 1) / 2 * 255).astype(np.uint8).reshape(n, 1, 16, 16)
        out[split] = (pixels, labels.astype(np.int64))
    return out


def write_idx(root: Path, folder: str, n_train: int = 300, n_test: int = 100, compress: bool = True) -> Arrays:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out: Arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        files = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x801, n) + labels.tobytes(),
        }
        for name, payload in files.items():
            if compress:
                (raw / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (raw / name).write_bytes(payload)
        out[split] = (images[:, None], labels.astype(np.int64))
    return out


def write_all(root: Path) -> Path:
    write_cifar(root, 10)
    write_cifar(root, 100, n_train=400, n_test=200)
    write_imagefolder(root)
    write_usps(root)
    write_idx(root, "MNIST")
    write_idx(root, "FashionMNIST")
    return root
