"""A user's own architecture: `model=custom model.target=package.module:Factory model.kwargs={...}`.

The factory (a class or a function) is called with `model.kwargs` and must return an `nn.Module`; its permutation
spec is traced (spec/trace.py) unless the model defines `permutation_spec()`. Its weights come from
`checkpoints=[...]` (mergebench/checkpoints.py): a custom model is never trained here, since the cache could not
tell when the user's code changed.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from mergebench.errors import ConfigError
from mergebench.models.registry import MODELS, ModelInput
from mergebench.zoo import timm as zoo_timm
from mergebench.zoo import torchvision as zoo_torchvision

# zoo packages (`model.target=torchvision.models:resnet18`, `timm:create_model`) are imported the one way
# mergebench imports them
ZOO_PACKAGES: dict[str, Callable[[], object]] = {"torchvision": zoo_torchvision, "timm": zoo_timm}


def load_factory(target: str) -> Callable[..., nn.Module]:
    """`package.module:Name` (or `package.module:Outer.Name`) -> the object; the working folder is importable, as
    for `python -m`, so a module next to the user's checkpoints needs no install."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"target={target!r} must name a factory as package.module:Factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    zoo_import = ZOO_PACKAGES.get(module_name.split(".")[0])
    if zoo_import is not None:
        zoo_import()  # torchvision/timm through the zoo module: its CPU-torch shim, or one line saying why not
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"target={target!r}: cannot import {module_name}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"target={target!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"target={target!r} is not callable")
    return obj


@dataclasses.dataclass
class CustomParams:
    target: str = ""
    kwargs: dict[str, Any] | None = None  # null in the YAML, so `model.kwargs={a: 1}` may add keys

    def check(self) -> None:
        if not self.target:
            raise ConfigError("target is required with model=custom: model.target=package.module:Factory")
        load_factory(self.target)


def build(params: CustomParams) -> nn.Module:
    try:
        model = load_factory(params.target)(**(params.kwargs or {}))
    except TypeError as err:
        raise ConfigError(f"model.target={params.target} with model.kwargs={params.kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.target={params.target} returned a {type(model).__name__}, not a torch nn.Module")
    return model


@MODELS.register("custom", CustomParams)
def build_custom(params: CustomParams, data: ModelInput) -> nn.Module:
    """The data's shape is the user's business (their factory's kwargs); the pipeline checks the logits' width."""
    return build(params)
