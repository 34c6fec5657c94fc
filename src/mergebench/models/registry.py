"""The architecture contracts and registry: name -> (builder, params dataclass)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

from torch import nn

from mergebench.registry import Registry
from mergebench.spec import PermutationSpec


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """What an architecture needs to know about the data."""

    channels: int
    size: int
    num_classes: int


@runtime_checkable
class Architecture(Protocol):
    """A model that states its permutation spec (which group acts on each axis of each tensor), so merging needs
    nothing else from it; a model without one (model=custom) gets a traced spec."""

    def permutation_spec(self) -> PermutationSpec: ...


class ModelBuilder(Protocol):
    """Builds an untrained nn.Module (an Architecture for the built-in models) for data of this shape."""

    def __call__(self, params: Any, data: ModelInput) -> nn.Module: ...


MODELS: Registry[ModelBuilder] = Registry("model", "mergebench.models")
