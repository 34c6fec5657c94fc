"""Registries for aggregators, repairs and K-model strategies, and what an aggregator returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from mergebench.registry import Registry


@dataclasses.dataclass
class Merged:
    """The merged model, the weight each source had in it (REPAIR's goals use them) and diagnostics."""

    model: nn.Module
    weights: list[float]
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)


AGGREGATORS: Registry[Callable[..., Merged]] = Registry("agg")
REPAIRS: Registry[Callable[..., nn.Module]] = Registry("repair")
STRATEGIES: Registry[Callable[..., Merged]] = Registry("merge.strategy")
