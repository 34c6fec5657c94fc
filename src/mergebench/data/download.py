"""Fetching datasets into `data.root` through torchvision (`pip install mergebench[vision]`), which writes the
very layouts the readers in datasets.py expect. torchvision is imported lazily: without it nothing downloads."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from mergebench.errors import DataNotFoundError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _both_splits(cls_name: str) -> Callable[[Any, Path], None]:
    def fetch(datasets: Any, root: Path) -> None:
        for train in (True, False):
            getattr(datasets, cls_name)(str(root), train=train, download=True)

    return fetch


def _tiny_imagenet(datasets: Any, root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(TINY_IMAGENET_URL, str(root))


FETCHERS: dict[str, Callable[[Any, Path], None]] = {
    "mnist": _both_splits("MNIST"),
    "fashion_mnist": _both_splits("FashionMNIST"),
    "cifar10": _both_splits("CIFAR10"),
    "cifar100": _both_splits("CIFAR100"),
    "usps": _both_splits("USPS"),
    "imagenet200": _tiny_imagenet,
}


def _torchvision_datasets() -> ModuleType | None:
    """torchvision.datasets, imported the one way mergebench imports torchvision (mergebench.zoo); None where it
    cannot be imported: then nothing downloads."""
    from mergebench.zoo import ZooUnavailable, torchvision

    try:
        return importlib.import_module(torchvision().__name__ + ".datasets")
    except (ZooUnavailable, ImportError):
        return None


def can_download(name: str) -> str | None:
    """None when `name` can be fetched here; else the reason, phrased to follow 'data.download=true ...'."""
    if name not in FETCHERS:
        return f"cannot fetch {name}"
    if _torchvision_datasets() is None:
        return "needs torchvision: pip install mergebench[vision] (or point data.root at the files)"
    return None


def download_dataset(name: str, root: Path) -> None:
    problem = can_download(name)
    if problem is not None:
        raise DataNotFoundError(f"dataset={name}: data.download=true {problem}")
    root.mkdir(parents=True, exist_ok=True)
    FETCHERS[name](_torchvision_datasets(), root)
