"""Activation matching ("Permute"): per group, match B's units to A's by Pearson correlation over the merge data.

All groups come from one streamed pass of both models (the REPAIR notebooks' layer-by-layer prefix passes
cost O(L²) forwards; this costs one), then one linear assignment per group. Units dead on the merge data (no
variance: a ReLU never active, a squeeze-excite gate saturated) correlate with nothing; the pairs the assignment
made of them are rematched by their weights (weight matching's cost, the other groups as the activations placed
them), and counted in the diagnostics (`dead_units`).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mergebench.align.activations import GroupStats, activation_stats
from mergebench.align.registry import ALIGNERS, Alignment
from mergebench.align.weight_matching import parameters, rematch_by_weights
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.spec import Transform


@dataclasses.dataclass
class PermuteParams:
    batch_size: int | None = None

    def check(self) -> None:
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive integer or null (eval batch size)")


def correlation_matching(stats: dict[str, GroupStats]) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """The permutation per group maximising the summed correlation of matched units (`perm[i]` = B's unit
    matched to A's unit i), A's units per group whose pair has a dead side, and the mean correlation of the
    pairs of live units."""
    perms, dead, matched = {}, {}, []
    for group, s in stats.items():
        corr = s.correlation().cpu()
        rows, cols = (torch.from_numpy(i) for i in linear_sum_assignment(corr.numpy(), maximize=True))
        perms[group] = cols
        unplaced = s.dead_a.cpu()[rows] | s.dead_b.cpu()[cols]
        if unplaced.any():
            dead[group] = rows[unplaced]
        matched.append(corr[rows[~unplaced], cols[~unplaced]])
    live = torch.cat(matched) if matched else torch.empty(0)
    return perms, dead, live.mean().item() if live.numel() else float("nan")


@ALIGNERS.register("permute", PermuteParams, label="Permute", abbrev="P")
def align_permute(params: PermuteParams, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> Alignment:
    start = time.perf_counter()
    batches = ctx.fit_batches(batch_size=params.batch_size or ctx.eval_batch_size)
    perms, dead, mean_corr = correlation_matching(activation_stats(ctx.spec, ref, other, batches))
    if dead:
        perms = rematch_by_weights(ctx.spec, parameters(ref), parameters(other), perms, dead)
    diagnostics = {
        "mean_corr": mean_corr,
        "dead_units": sum(d.numel() for d in dead.values()),
        "dead_by_group": {g: d.numel() for g, d in dead.items()},
        "seconds": time.perf_counter() - start,
    }
    return Alignment({g: Transform.permutation(p) for g, p in perms.items()}, diagnostics)
