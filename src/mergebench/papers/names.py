"""The papers' names for datasets, architectures, splits and components, shared by their table layouts."""

from __future__ import annotations

import pandas as pd

from mergebench.registry import Registry

DATASET_NAMES = {
    "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST", "fashion_mnist": "FMNIST",
    "digits": "digits", "imagenet200": "ImageNet-200", "usps": "USPS",
}  # fmt: skip
ARCH_NAMES = {"vgg11": "VGG11", "resnet20": "ResNet20", "resnet18": "ResNet18", "mlp": "MLP"}
SPLIT_NAMES = {"split_80_20": "80%-20%", "dirichlet": "Dirichlet", "same": "same", "split_classes": "SPLIT"}


def paper_name(registry: Registry, name: str, field: str = "label") -> str:
    """The paper's name a component registered with (its `label`, or `abbrev`: NP, Finetune), else its config name."""
    if name not in registry.names():
        return name
    return getattr(registry.get(name), field) or name


def merge_data_size(row: pd.Series) -> str:
    """Examples per class of the merge data (`10` of `union/10pc`), or `train` for all of it."""
    data = str(row.merge_data)
    return data.split("/")[1].removesuffix("pc") if "/" in data else "train"
