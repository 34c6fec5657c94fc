"""The data align/aggregate/repair may use: a source (union or one client), optionally k per class (of the pooled
source, or of each client's data: YM's coresets take k per class from model A's and from model B's dataset), minus
a validation carve-out for hyper-parameter selection. Test data is never part of it."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mergebench.data.splits import Scenario
from mergebench.errors import ConfigError

PER_CLASS_FROM = ("union", "each_client")


@dataclasses.dataclass
class MergeDataConfig:
    source: str = "union"
    per_class: int | None = None
    per_class_from: str = "union"  # union: k per class of the pooled source | each_client: k per class per client
    val_fraction: float = 0.1
    seed: int = 0

    def check(self) -> None:
        if self.source != "union" and not self.source.isdigit():
            raise ConfigError(f"source={self.source!r} must be 'union' or a client index")
        if self.per_class is not None and self.per_class <= 0:
            raise ConfigError(f"per_class={self.per_class} must be a positive integer or null (all)")
        if self.per_class_from not in PER_CLASS_FROM:
            raise ConfigError(f"per_class_from={self.per_class_from!r} must be one of {', '.join(PER_CLASS_FROM)}")
        if self.per_class_from == "each_client" and self.source != "union":
            raise ConfigError("per_class_from=each_client needs source=union (one client's data is one pool)")
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
        if cfg.per_class_from == "each_client":  # clients may share examples: k per class each, then deduplicated
            picked = [_first_per_class(pool[torch.isin(pool, c)], scenario, cfg.per_class) for c in scenario.clients]
            keep = torch.isin(pool, torch.cat(picked))
        else:
            keep = torch.isin(pool, _first_per_class(pool, scenario, cfg.per_class))
        pool = pool[keep]  # still in the shuffled order: the validation carve-out below is a random subset
    n_val = int(pool.numel() * cfg.val_fraction) if pool.numel() > 1 else 0
    if cfg.val_fraction > 0 and pool.numel() > 1:
        n_val = max(1, n_val)
    return MergeData(fit=pool[n_val:].sort().values, val=pool[:n_val].sort().values)


def _first_per_class(pool: Tensor, scenario: Scenario, k: int) -> Tensor:
    """The first k examples of each class in `pool`'s order."""
    labels = scenario.train.y[pool]
    return torch.cat([pool[labels == cls][:k] for cls in labels.unique()])
