"""Scenarios: how one dataset (or several) becomes K client train sets, a test set and named test subsets.

Every split is a deterministic function of (dataset, split params, split_seed). Clients are index lists into
one training pool, so a rotated or cross-dataset scenario is the same shape as a class split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mergebench.data.adapt import resize
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.errors import ConfigError
from mergebench.registry import Registry

Loader = Callable[[str], tuple[DatasetInfo, ImageData, ImageData]]


@dataclasses.dataclass
class Scenario:
    info: DatasetInfo
    train: ImageData
    test: ImageData
    clients: list[Tensor]
    test_subsets: dict[str, Tensor]

    def manifest(self) -> dict:
        """Per-client class counts and sizes: what a reader of the run needs to trust the split."""
        classes = self.info.num_classes
        return {
            "dataset": self.info.name,
            "train_pool": len(self.train),
            "test": len(self.test),
            "clients": [
                {
                    "size": int(idx.numel()),
                    "class_counts": torch.bincount(self.train.y[idx], minlength=classes).tolist(),
                }
                for idx in self.clients
            ],
            "test_subsets": {name: int(idx.numel()) for name, idx in self.test_subsets.items()},
        }


@dataclasses.dataclass(frozen=True)
class SplitRequest:
    """What every split receives: the primary dataset, a loader for others, K, and the seed."""

    dataset: str
    load: Loader
    num_models: int
    seed: int


class Split(Protocol):
    """Builds a scenario from the request; deterministic in (dataset, `params`, request.seed)."""

    def __call__(self, params: Any, req: SplitRequest) -> Scenario: ...


SPLITS: Registry[Split] = Registry("data", "mergebench.data")


def _single(req: SplitRequest, clients: list[Tensor], subsets: dict[str, Tensor] | None = None) -> Scenario:
    info, train, test = req.load(req.dataset)
    return Scenario(info, train, test, clients, {"test": torch.arange(len(test)), **(subsets or {})})


def _class_indices(y: Tensor, cls: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(y.numpy() == cls)
    return rng.permutation(idx)


def _require_two(req: SplitRequest, split: str) -> None:
    if req.num_models != 2:
        raise ConfigError(f"data.num_models={req.num_models}: data={split} defines exactly 2 clients")


@SPLITS.register("same")
def split_same(params: None, req: SplitRequest) -> Scenario:
    """Every client gets the whole train set; models differ by init seed and data order."""
    _, train, _ = req.load(req.dataset)
    return _single(req, [torch.arange(len(train)) for _ in range(req.num_models)])


@dataclasses.dataclass
class Split8020Params:
    fraction: float = 0.8

    def check(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"fraction={self.fraction} must be in (0, 1)")


@SPLITS.register("split_80_20", Split8020Params)
def split_80_20(params: Split8020Params, req: SplitRequest) -> Scenario:
    """Per class, client 0 gets 1-fraction of the first half of the classes and fraction of the second half."""
    _require_two(req, "split_80_20")
    info, train, _ = req.load(req.dataset)
    rng = np.random.default_rng(req.seed)
    half = info.num_classes // 2
    parts: list[list[np.ndarray]] = [[], []]
    for cls in range(info.num_classes):
        idx = _class_indices(train.y, cls, rng)
        cut = round(len(idx) * (1.0 - params.fraction))
        first, rest = idx[:cut], idx[cut:]
        small, large = (0, 1) if cls < half else (1, 0)
        parts[small].append(first)
        parts[large].append(rest)
    clients = [torch.from_numpy(np.sort(np.concatenate(p))) for p in parts]
    return _single(req, clients, _class_halves(req, half))


def _class_halves(req: SplitRequest, half: int) -> dict[str, Tensor]:
    _, _, test = req.load(req.dataset)
    return {
        "classes_a": torch.nonzero(test.y < half).flatten(),
        "classes_b": torch.nonzero(test.y >= half).flatten(),
    }


@dataclasses.dataclass
class DirichletParams:
    concentration: float = 0.5

    def check(self) -> None:
        if self.concentration <= 0:
            raise ConfigError(f"concentration={self.concentration} must be > 0")


@SPLITS.register("dirichlet", DirichletParams)
def split_dirichlet(params: DirichletParams, req: SplitRequest) -> Scenario:
    """Per class (in a shuffled order) draw client proportions from Dirichlet(concentration · 1_K)."""
    info, train, _ = req.load(req.dataset)
    rng = np.random.default_rng(req.seed)
    k = req.num_models
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for cls in rng.permutation(info.num_classes):
        idx = _class_indices(train.y, int(cls), rng)
        p = rng.dirichlet(np.full(k, params.concentration))
        counts = np.floor(p * len(idx)).astype(int)
        for _ in range(len(idx) - counts.sum()):
            counts[rng.integers(k)] += 1
        start = 0
        for client, n in enumerate(counts):
            parts[client].append(idx[start : start + n])
            start += n
    clients = [torch.from_numpy(np.sort(np.concatenate(p))) for p in parts]
    return _single(req, clients)


@dataclasses.dataclass
class SplitClassesParams:
    classes: list[list[int]] | None = None


@SPLITS.register("split_classes", SplitClassesParams)
def split_classes(params: SplitClassesParams, req: SplitRequest) -> Scenario:
    """Disjoint class subsets (SPLIT-CIFAR): client k gets every example of its classes; heads keep all C."""
    info, train, test = req.load(req.dataset)
    if params.classes is None:
        order = np.random.default_rng(req.seed).permutation(info.num_classes)
        groups = [sorted(int(c) for c in g) for g in np.array_split(order, req.num_models)]
    else:
        groups = [list(g) for g in params.classes]
        flat = [c for g in groups for c in g]
        if (
            len(groups) != req.num_models
            or len(set(flat)) != len(flat)
            or not set(flat) <= set(range(info.num_classes))
        ):
            raise ConfigError(
                f"data.classes={groups} must be {req.num_models} disjoint lists of classes in 0..{info.num_classes - 1}"
            )
    clients = [torch.nonzero(torch.isin(train.y, torch.tensor(g))).flatten() for g in groups]
    subsets = {
        f"classes_{k}": torch.nonzero(torch.isin(test.y, torch.tensor(g))).flatten() for k, g in enumerate(groups)
    }
    return _single(req, clients, subsets)


ROTATE_MODES = ("bilinear", "nearest", "bicubic")


def rotate(x: Tensor, degrees: float, interpolation: str = "bilinear", fill: float = 0.0) -> Tensor:
    """Rotate uint8 images counter-clockwise about their centre, once, as tensors; pixels from outside the image
    take `fill`. Bilinear with zero fill is what YM does (torchvision's `rotate` on PIL images)."""
    if interpolation not in ROTATE_MODES:
        raise ConfigError(f"interpolation={interpolation!r} is not known; allowed: {', '.join(ROTATE_MODES)}")
    if degrees % 360 == 0:
        return x.clone()
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    mat = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    # sampling is linear in the image, so rotating x - fill with zero padding and adding fill back pads with fill
    out = F.grid_sample(x.float() - fill, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    return (out + fill).round().clamp(0, 255).to(torch.uint8)


def _concat(parts: list[ImageData]) -> ImageData:
    return ImageData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def _pooled(parts_train: list[ImageData], parts_test: list[ImageData], info: DatasetInfo) -> Scenario:
    train, test = _concat(parts_train), _concat(parts_test)
    clients, subsets, start, tstart = [], {"test": torch.arange(len(test))}, 0, 0
    for k, (tr, te) in enumerate(zip(parts_train, parts_test)):
        clients.append(torch.arange(start, start + len(tr)))
        subsets[f"client_{k}"] = torch.arange(tstart, tstart + len(te))
        start, tstart = start + len(tr), tstart + len(te)
    return Scenario(info, train, test, clients, subsets)


@dataclasses.dataclass
class RotatedParams:
    angle: float = 90.0
    interpolation: str = "bilinear"  # bilinear | nearest | bicubic
    fill: float = 0.0  # the value (0-255) of pixels rotated in from outside the image

    def check(self) -> None:
        if self.interpolation not in ROTATE_MODES:
            raise ConfigError(f"interpolation={self.interpolation!r} is not known; allowed: {', '.join(ROTATE_MODES)}")
        if not 0 <= self.fill <= 255:
            raise ConfigError(f"fill={self.fill} must lie in [0, 255] (uint8 pixels)")


@SPLITS.register("rotated", RotatedParams)
def split_rotated(params: RotatedParams, req: SplitRequest) -> Scenario:
    """Client 0 = the dataset, client 1 = the same dataset rotated by `angle`; test = the union of both."""
    _require_two(req, "rotated")
    info, train, test = req.load(req.dataset)
    rot_train = ImageData(rotate(train.x, params.angle, params.interpolation, params.fill), train.y.clone())
    rot_test = ImageData(rotate(test.x, params.angle, params.interpolation, params.fill), test.y.clone())
    return _pooled([train, rot_train], [test, rot_test], info)


@dataclasses.dataclass
class CrossDatasetParams:
    others: list[str] = dataclasses.field(default_factory=lambda: ["fashion_mnist"])
    size: int | None = None

    def datasets_read(self) -> dict[str, list[str]]:
        """The datasets beside data.dataset that this split reads, by key (checked before a sweep starts)."""
        return {"others": list(self.others)}


@SPLITS.register("cross_dataset", CrossDatasetParams)
def split_cross_dataset(params: CrossDatasetParams, req: SplitRequest) -> Scenario:
    """Client 0 = data.dataset, client k = others[k-1], all resized to `size` (default: client 0's); label i
    means i in every dataset."""
    if req.num_models != 1 + len(params.others):
        raise ConfigError(
            f"data.num_models={req.num_models}: data=cross_dataset needs 1 + len(data.others)"
            f" = {1 + len(params.others)} models"
        )
    info, train, test = req.load(req.dataset)
    size = params.size or info.size
    trains, tests = [ImageData(resize(train.x, size), train.y)], [ImageData(resize(test.x, size), test.y)]
    for name in params.others:
        other, tr, te = req.load(name)
        if other.num_classes != info.num_classes or other.channels != info.channels:
            raise ConfigError(
                f"data.others={name!r} has {other.num_classes} classes × {other.channels} channels;"
                f" {info.name} has {info.num_classes} × {info.channels}"
            )
        trains.append(ImageData(resize(tr.x, size), tr.y))
        tests.append(ImageData(resize(te.x, size), te.y))
    pool = torch.cat([t.x for t in trains]).float() / 255
    mean = tuple(pool.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pool.std(dim=(0, 2, 3)).tolist())
    name = "+".join([info.name, *params.others])
    return _pooled(trains, tests, dataclasses.replace(info, name=name, size=size, mean=mean, std=std))
