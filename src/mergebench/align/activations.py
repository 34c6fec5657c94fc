"""Passes over the merge data that aligners (and REPAIR) share.

`stacked_moments` runs K models side by side over the batches once, with forward hooks on every group's probe
modules, and streams per-group means and covariances of all models' units stacked into float64 accumulators of size
(K·width)² — activations are never kept beyond the chunk that produced them. `activation_stats` reads A's and B's
statistics (permute, CCA, OT, REPAIR) from it with K = 2, ZipIt! its K-model correlation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from mergebench.modes import evaluating, forward_hooks
from mergebench.spec import PermutationSpec, ProbeView, probe_module


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """One group's unit statistics over all its samples (float64, population normalisation 1/count).

    Every spatial position of a conv map is a sample, and a group with several probes (a residual stream)
    pools the samples of all of them; `cov_ab[i, j]` pairs A's unit i and B's unit j at the same sample.
    """

    count: int
    mean_a: Tensor
    mean_b: Tensor
    cov_a: Tensor
    cov_b: Tensor
    cov_ab: Tensor

    @property
    def std_a(self) -> Tensor:
        return self.cov_a.diagonal().clamp_min(0).sqrt()

    @property
    def std_b(self) -> Tensor:
        return self.cov_b.diagonal().clamp_min(0).sqrt()

    @property
    def dead_a(self) -> Tensor:
        return dead_units(self.std_a)

    @property
    def dead_b(self) -> Tensor:
        return dead_units(self.std_b)

    def correlation(self) -> Tensor:
        """Pearson correlation A×B, free of scale: a unit's correlation does not depend on its variance, however
        small (an absolute epsilon in the denominator understated low-variance units). Dead units correlate 0."""
        return self.cov_ab / torch.outer(_live_std(self.std_a), _live_std(self.std_b))


# a unit whose standard deviation on the merge data is below this fraction of its group's largest carries nothing
# but rounding there: it correlates 0 with every unit, and aligners place it by other means
DEAD_STD = 1e-6


def dead_units(std: Tensor, reference: Tensor | float | None = None) -> Tensor:
    """Which units are dead on the data (a boolean mask), relative to `reference`: by default the largest std among
    them; a whole group whose signal vanished (rounding noise only) is dead against the network's largest."""
    top = std.max() if reference is None else torch.as_tensor(reference, dtype=std.dtype, device=std.device)
    return ~(std > DEAD_STD * top.clamp_min(torch.finfo(std.dtype).tiny))


def _live_std(std: Tensor) -> Tensor:
    return std.masked_fill(dead_units(std), float("inf"))


STATS_CHUNK = 100  # samples per forward in the statistics pass: every model's probe outputs wait for the last's


CHANNELS_FIRST = ProbeView()


def channel_first(output: Tensor, view: ProbeView = CHANNELS_FIRST) -> Tensor:
    """A probe's output [N, C, *spatial] (or [N, C]; or as `view` says: units last, other permuted axes averaged
    out) with the units first, then the samples."""
    output = output.detach()
    if view.pooled:
        output = output.mean(dim=view.pooled, keepdim=True)
    output = output.movedim(view.axis, 0)
    return output if view.segment is None else output[view.segment[0] : view.segment[1]]


class StackedMoments:
    """Running float64 sums and sums of products of one group's units of K models, stacked as one vector
    [model 0's units, model 1's, …] over the samples the models see together.

    Each model's probe outputs (units first) wait until every model has run the same chunk of samples; `fold` then
    copies them, shifted by the first chunk's means (so a large mean does not swamp the variance when the product
    runs in the model's dtype), into one [Σ widths, samples] matrix z and adds z·zᵀ (every pair of models'
    cross-covariance in one matmul) to the accumulator. Memory is O((Σ widths)²) plus one chunk's probe outputs.
    """

    def __init__(self, num_models: int) -> None:
        self.outputs: list[list[Tensor]] = [[] for _ in range(num_models)]
        self.widths: list[int] = []
        self.count = 0
        self.shift: Tensor | None = None
        self.sums: Tensor | None = None
        self.products: Tensor | None = None

    def fold(self) -> None:
        """Fold the outputs waiting since the last fold: the i-th probe call of every model saw the same samples."""
        for calls in zip(*self.outputs, strict=True):
            if self.shift is None:
                self.widths = [units.shape[0] for units in calls]
                self.shift = torch.cat([units.reshape(units.shape[0], -1).mean(1) for units in calls])
                size = sum(self.widths)
                self.sums = torch.zeros(size, dtype=torch.float64, device=self.shift.device)
                self.products = torch.zeros(size, size, dtype=torch.float64, device=self.shift.device)
            assert self.sums is not None and self.products is not None
            z = torch.empty(sum(self.widths), calls[0][0].numel(), dtype=calls[0].dtype, device=calls[0].device)
            start = 0
            for units, width in zip(calls, self.widths, strict=True):
                shift = self.shift[start : start + width].view(-1, *(1,) * (units.dim() - 1))
                torch.sub(units, shift, out=z[start : start + width].view(units.shape))
                start += width
            self.count += z.shape[1]
            self.sums += z.sum(dim=1, dtype=torch.float64)
            self.products += z @ z.T
        for outputs in self.outputs:
            outputs.clear()

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """The stacked vector's mean and covariance (population normalisation 1/count), the shift undone."""
        assert self.shift is not None and self.sums is not None and self.products is not None, "probes never ran"
        mean = self.sums / self.count
        cov = self.products / self.count - torch.outer(mean, mean)
        return mean + self.shift.double(), cov

    def correlation(self) -> Tensor:
        """Pearson correlation of all stacked units (ZipIt!'s K·n × K·n similarity)."""
        _, cov = self.mean_cov()
        std = torch.cat([_live_std(part) for part in cov.diagonal().clamp_min(0).sqrt().split(self.widths)])
        return cov / torch.outer(std, std)

    def pair_stats(self) -> GroupStats:
        """Models 0 and 1 as A and B."""
        mean, cov = self.mean_cov()
        a, b = self.widths[0], self.widths[0] + self.widths[1]
        return GroupStats(
            count=self.count,
            mean_a=mean[:a],
            mean_b=mean[a:b],
            cov_a=cov[:a, :a],
            cov_b=cov[a:b, a:b],
            cov_ab=cov[:a, a:b],
        )


@torch.no_grad()
def stacked_moments(
    spec: PermutationSpec,
    models: list[nn.Module],
    batches: Iterable[tuple[Tensor, Tensor | None]],
    groups: Iterable[str] | None = None,
) -> dict[str, StackedMoments]:
    """Per group, the moments of all models' units stacked, from one eval-mode pass of every model over `batches`
    (every spatial position a sample; a group's probes pool their samples).

    Probe outputs are read after every model ran a chunk, so they must not be modified in place by later layers
    (no architecture here does; the streaming test would catch it).
    """
    accumulators = {g: StackedMoments(len(models)) for g in (spec.probes if groups is None else groups)}
    hooks = []
    for k, model in enumerate(models):
        modules = dict(model.named_modules())
        for group, acc in accumulators.items():
            for probe in spec.probes[group]:
                view = spec.probe_views.get(probe, CHANNELS_FIRST)
                hooks.append((modules[probe_module(probe)], _units_to(acc.outputs[k].append, view)))
    with forward_hooks(hooks), evaluating(*models):
        for x, _ in batches:
            for chunk in x.split(STATS_CHUNK):  # eval mode: per-sample, so chunking changes nothing but memory
                for model in models:
                    model(chunk)
                for acc in accumulators.values():
                    acc.fold()
    return accumulators


def _units_to(sink: Callable[[Tensor], None], view: ProbeView) -> Callable[..., None]:
    """A forward hook that hands its module's output, units first, to `sink`."""
    return lambda module, inputs, output: sink(channel_first(output, view))


def activation_stats(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    groups: Iterable[str] | None = None,
) -> dict[str, GroupStats]:
    """Per-group statistics of A's and B's probe outputs in one eval-mode pass of both models over `batches`."""
    return {g: m.pair_stats() for g, m in stacked_moments(spec, [model_a, model_b], batches, groups).items()}
