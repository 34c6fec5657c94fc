"""Activation matching ("Permute"): per group, match B's units to A's by Pearson correlation over the merge data.

All groups come from one streamed pass of both models (the REPAIR notebooks' layer-by-layer prefix passes
cost O(L²) forwards; this costs one), then one linear assignment per group.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergebench.align.activations import GroupStats, activation_stats
from mergebench.align.registry import ALIGNERS, Alignment
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.spec import Transform


@dataclasses.dataclass
class PermuteParams:
    batch_size: int | None = None

    def check(self) -> None:
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive integer or null (eval batch size)")


def correlation_matching(stats: dict[str, GroupStats]) -> tuple[dict[str, Transform], float]:
    """The permutation per group maximising the summed correlation of matched units (`perm[i]` = B's unit
    matched to A's unit i), and the mean correlation of all matched pairs."""
    transforms, matched = {}, []
    for group, s in stats.items():
        corr = s.correlation().cpu()
        rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
        transforms[group] = Transform.permutation(torch.from_numpy(cols))
        matched.append(corr[torch.from_numpy(rows), torch.from_numpy(cols)])
    return transforms, torch.cat(matched).mean().item()


@ALIGNERS.register("permute", PermuteParams, label="Permute", abbrev="P")
def align_permute(params: PermuteParams, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> Alignment:
    start = time.perf_counter()
    batches = ctx.fit_batches(batch_size=params.batch_size or ctx.eval_batch_size)
    transforms, mean_corr = correlation_matching(activation_stats(ctx.spec, ref, other, batches))
    return Alignment(transforms, {"mean_corr": mean_corr, "seconds": time.perf_counter() - start})
