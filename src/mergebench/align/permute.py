"""Activation matching ("Permute"): per group, match B's units to A's by Pearson correlation over the merge data.

All groups come from one streamed pass of both models (the REPAIR notebooks' layer-by-layer prefix passes
cost O(L²) forwards; this costs one), then one linear assignment per group. Units dead on the merge data (no
variance: a ReLU never active, a squeeze-excite gate saturated) correlate with nothing, and units the data cannot
tell apart (a block of units each active on the same single sample correlates 1 throughout) tie; the pairs the
assignment made of either are rematched by their weights (weight matching's cost, the other groups as the
activations placed them), and counted in the diagnostics (`dead_units`, `tied_units`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mergebench.align.activations import GroupStats, activation_stats, dead_units
from mergebench.align.assignment import assign, assign_heads
from mergebench.align.options import AttentionOptions
from mergebench.align.registry import ALIGNERS, PairAlignment, pairwise_aligner
from mergebench.align.weight_matching import parameters, place_by_weights, rematch_by_weights
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.spec import PermutationSpec, Transform


@dataclasses.dataclass
class PermuteParams(AttentionOptions):
    batch_size: int | None = None

    def check(self) -> None:
        super().check()
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive integer or null (eval batch size)")


# two candidates whose correlations with a unit differ by no more than this are ones the data cannot tell apart
# (units active on the same single sample correlate 1 with each other; float32 rounding moves that by ~1e-6)
TIE = 1e-5


@dataclasses.dataclass(frozen=True)
class CorrelationMatch:
    """Per group: `perms[g][i]` = B's unit matched to A's unit i; A's units whose pair has a dead side (`dead`) or
    whose match the data cannot tell from another (`tied`), both for weights to place; the mean correlation of the
    pairs of live units."""

    perms: dict[str, Tensor]
    dead: dict[str, Tensor]
    tied: dict[str, Tensor]
    mean_corr: float

    def unplaced(self) -> dict[str, Tensor]:
        """A's units per group that the correlation did not place, dead or tied."""
        groups = self.dead.keys() | self.tied.keys()
        empty = torch.empty(0, dtype=torch.long)
        return {g: torch.cat([self.dead.get(g, empty), self.tied.get(g, empty)]).unique() for g in sorted(groups)}


def tied_units(corr: Tensor, cols: Tensor, live_a: Tensor, live_b: Tensor) -> Tensor:
    """A's live units (rows, matched to `cols`) with another live candidate within TIE of their match's
    correlation, closed over the rows holding those candidates, so that a rematch among their held units unties
    them."""
    rows = torch.arange(len(cols))
    near = ((corr - corr[rows, cols][:, None]).abs() <= TIE) & live_a[:, None] & live_b[None, :]
    near[rows, cols] = False
    tied = near.any(1)
    while True:
        grown = tied | near[tied].any(0)[cols]
        if torch.equal(grown, tied):
            return torch.nonzero(tied).flatten()
        tied = grown


def correlation_matching(stats: dict[str, GroupStats], spec: PermutationSpec | None = None) -> CorrelationMatch:
    """The permutation per group maximising the summed correlation of matched units; the spec's groups made of
    attention heads by whole heads, one head permutation per tie maximising the summed correlation of its groups."""
    corrs = {group: s.correlation().cpu() for group, s in stats.items()}
    found = {} if spec is None else _head_matching(corrs, spec)
    dead, tied, matched = {}, {}, []
    perms = {}
    # a unit is dead against the network's largest std too: a group whose whole signal vanished into rounding (a
    # random ImageNet net's last stage at 32×32) holds only noise, which correlates by chance
    top_a = max((s.std_a.max().item() for s in stats.values()), default=0.0)
    top_b = max((s.std_b.max().item() for s in stats.values()), default=0.0)
    ties = spec.ties() if spec is not None else {}
    unmatched = {g for members in ties.values() if not all(m in found for m in members) for g in members}
    for group, s in stats.items():
        if group in unmatched:  # a tie with a group no probe reads: placed by weights, whole
            continue
        corr = corrs[group]
        rows = torch.arange(len(corr))
        cols = found[group] if group in found else assign(corr, "scipy")
        perms[group] = cols
        dead_a = dead_units(s.std_a, top_a).cpu()  # against the network's largest: includes the group's own dead
        dead_b = dead_units(s.std_b, top_b).cpu()
        unplaced = dead_a[rows] | dead_b[cols]
        if unplaced.any():
            dead[group] = rows[unplaced]
        ties = tied_units(corr, cols, ~dead_a, ~dead_b)
        if ties.numel():
            tied[group] = ties
        matched.append(corr[rows[~unplaced], cols[~unplaced]])
    live = torch.cat(matched) if matched else torch.empty(0)
    return CorrelationMatch(perms, dead, tied, live.mean().item() if live.numel() else float("nan"))


def _head_matching(corrs: Mapping[str, Tensor], spec: PermutationSpec) -> dict[str, Tensor]:
    """The flat permutations of every tie whose head groups all have correlations, each tie solved at once (its
    own group, a head-indexed bias, takes σ)."""
    out: dict[str, Tensor] = {}
    for tie, members in spec.ties().items():
        if not all(g in corrs for g in members):
            continue
        perms, sigma = assign_heads([corrs[g] for g in members], spec.heads[members[0]].count, corrs.get(tie))
        out.update(zip(members, perms, strict=True))
        if tie in spec.groups:
            out[tie] = sigma
    return out


@ALIGNERS.register("permute", PermuteParams, label="Permute", abbrev="P")
@pairwise_aligner
def align_permute(params: PermuteParams, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> PairAlignment:
    start = time.perf_counter()
    spec = params.spec_for(ctx.spec)
    batches = ctx.fit_batches(batch_size=params.batch_size or ctx.eval_batch_size)
    match = correlation_matching(activation_stats(spec, ref, other, batches), spec)
    perms, unplaced = match.perms, match.unplaced()
    state_a, state_b = parameters(ref), parameters(other)
    if unplaced:
        perms = rematch_by_weights(spec, state_a, state_b, perms, unplaced)
    # heads inside one op (nn.MultiheadAttention) have no activation to read: their tie is placed by weights
    unprobed = [g for g in spec.head_groups() if g not in perms]
    if unprobed:
        perms = {**perms, **place_by_weights(spec, state_a, state_b, perms, unprobed)}
    diagnostics = {
        "mean_corr": match.mean_corr,
        "dead_units": sum(d.numel() for d in match.dead.values()),
        "dead_by_group": {g: d.numel() for g, d in match.dead.items()},
        "tied_units": sum(t.numel() for t in match.tied.values()),
        "weight_placed_groups": len(unprobed),
        "groups_left": len(ctx.spec.groups) - len(spec.groups),  # align.heads / align.residual = identity
        "seconds": time.perf_counter() - start,
    }
    return PairAlignment({g: Transform.permutation(p) for g, p in perms.items()}, diagnostics)


align_permute.aligns_heads = True  # type: ignore[attr-defined]  # heads matched by their summed correlations
