"""The contracts and registries of aggregators, repairs and K-model strategies, and what an aggregator returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mergebench.align.registry import Aligner
from mergebench.cache import atomic_write_bytes
from mergebench.context import MergeContext
from mergebench.registry import Component, Registry


@dataclasses.dataclass
class Merged:
    """The merged model, the weight each source had in it (REPAIR's goals use them), diagnostics for the results
    row, and tensors worth keeping beside it (e.g. NP Merge's learned α), one .pt file per artifact name.

    `aligned_to_first` is [model 0, model 1 aligned to it, …] when the strategy kept model 0 as the one reference
    (all_to_one; with a joint aligner, every model carried into its shared basis), so the interpolation curve
    reuses that alignment; empty when it merged in another order.
    """

    model: nn.Module
    weights: list[float]
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    aligned_to_first: list[nn.Module] = dataclasses.field(default_factory=list)

    def save_artifacts(self, folder: Path) -> list[Path]:
        """Write every artifact to `folder/<name>.pt` atomically; returns the paths written."""
        paths = []
        for name, tensors in self.artifacts.items():
            path = folder / f"{name}.pt"
            cpu = {k: v.detach().cpu() for k, v in tensors.items()}
            atomic_write_bytes(path, lambda f, cpu=cpu: torch.save(cpu, f))
            paths.append(path)
        return paths


class Aggregator(Protocol):
    """Merges models already in one basis (model 0's) into one model; `params` is its registered dataclass."""

    def __call__(self, params: Any, models: list[nn.Module], ctx: MergeContext) -> Merged: ...


class Repair(Protocol):
    """Fixes a merged model after aggregation (statistics, variance) given its aligned sources and their weights;
    returns it in eval mode."""

    def __call__(
        self, params: Any, merged: nn.Module, sources: list[nn.Module], weights: list[float], ctx: MergeContext
    ) -> nn.Module: ...


@dataclasses.dataclass(frozen=True)
class Methods:
    """The chosen aligner, aggregator and repair, which a strategy applies in its own order."""

    align: Component[Aligner]
    agg: Component[Aggregator]
    repair: Component[Repair]

    def check_spec(self, info: Mapping[str, Any]) -> None:
        """Let each method refuse a spec it cannot work with (`check_spec(info)` on its params: REPAIR and
        channels-last layers), given the spec's diagnostics, before anything is aligned."""
        for component in (self.align, self.agg, self.repair):
            hook = getattr(component.params, "check_spec", None)
            if hook is not None:
                hook(info)


class Strategy(Protocol):
    """Decides in which order K models are aligned, aggregated and repaired with `methods`."""

    def __call__(self, params: Any, models: list[nn.Module], methods: Methods, ctx: MergeContext) -> Merged: ...


AGGREGATORS: Registry[Aggregator] = Registry("agg", "mergebench.merging")
REPAIRS: Registry[Repair] = Registry("repair", "mergebench.merging")
STRATEGIES: Registry[Strategy] = Registry("strategy", "mergebench.merging")
