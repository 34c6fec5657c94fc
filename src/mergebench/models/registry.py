"""The architecture registry: name -> (builder, params dataclass)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from mergebench.registry import Registry


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """What an architecture needs to know about the data."""

    channels: int
    size: int
    num_classes: int


MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
