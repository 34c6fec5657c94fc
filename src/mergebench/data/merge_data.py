"""The data align/aggregate/repair may use: a source (union or one client), optionally k per class, minus a
validation carve-out for hyper-parameter selection. Test data is never part of it."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mergebench.data.splits import Scenario
from mergebench.errors import ConfigError


@dataclasses.dataclass
class MergeDataConfig:
    source: str = "union"
    per_class: int | None = None
    val_fraction: float = 0.1
    seed: int = 0

    def check(self) -> None:
        if self.source != "union" and not self.source.isdigit():
            raise ConfigError(f"source={self.source!r} must be 'union' or a client index")
        if self.per_class is not None and self.per_class <= 0:
            raise ConfigError(f"per_class={self.per_class} must be a positive integer or null (all)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class MergeData:
    fit: Tensor
    val: Tensor


def select_merge_data(scenario: Scenario, cfg: MergeDataConfig) -> MergeData:
    if cfg.source == "union":
        pool = torch.unique(torch.cat(scenario.clients))
    else:
        k = int(cfg.source)
        if k >= len(scenario.clients):
            raise ConfigError(f"merge_data.source={k} but there are only {len(scenario.clients)} clients")
        pool = scenario.clients[k]
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = pool[torch.randperm(pool.numel(), generator=gen)]
    if cfg.per_class is not None:
        labels = scenario.train.y[pool]
        keep = torch.zeros_like(pool, dtype=torch.bool)
        for cls in labels.unique():
            keep[torch.nonzero(labels == cls).flatten()[: cfg.per_class]] = True
        pool = pool[keep]
    n_val = int(pool.numel() * cfg.val_fraction) if pool.numel() > 1 else 0
    if cfg.val_fraction > 0 and pool.numel() > 1:
        n_val = max(1, n_val)
    return MergeData(fit=pool[n_val:].sort().values, val=pool[:n_val].sort().values)
