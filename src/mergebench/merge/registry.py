"""Registries for aggregators, repairs and K-model strategies, and what an aggregator returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergebench.cache import atomic_write_bytes
from mergebench.registry import Registry


@dataclasses.dataclass
class Merged:
    """The merged model, the weight each source had in it (REPAIR's goals use them), diagnostics for the results
    row, and tensors worth keeping beside it (e.g. NP Merge's learned α), one .pt file per artifact name.

    `sources` are the aligned models of the last aggregation, so the interpolation curve reuses the alignment.
    """

    model: nn.Module
    weights: list[float]
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    sources: list[nn.Module] = dataclasses.field(default_factory=list)

    def save_artifacts(self, folder: Path) -> list[Path]:
        """Write every artifact to `folder/<name>.pt` atomically; returns the paths written."""
        paths = []
        for name, tensors in self.artifacts.items():
            path = folder / f"{name}.pt"
            cpu = {k: v.detach().cpu() for k, v in tensors.items()}
            atomic_write_bytes(path, lambda f, cpu=cpu: torch.save(cpu, f))
            paths.append(path)
        return paths


AGGREGATORS: Registry[Callable[..., Merged]] = Registry("agg")
REPAIRS: Registry[Callable[..., nn.Module]] = Registry("repair")
STRATEGIES: Registry[Callable[..., Merged]] = Registry("merge.strategy")
