"""Passes over the merge data that aligners (and REPAIR) share.

`activation_stats` runs model A and model B side by side over the batches once, with forward hooks on every
group's probe modules, and streams per-group means, covariances and the A×B cross-covariance into float64
accumulators of size width² — activations are never kept beyond the batch that produced them.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from mergebench.spec import PermutationSpec, ProbeView


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

    def correlation(self, eps: float = 1e-4) -> Tensor:
        """Pearson correlation A×B; the eps keeps dead units (zero variance) at 0 instead of NaN."""
        return self.cov_ab / (torch.outer(self.std_a, self.std_b) + eps)


STATS_CHUNK = 100  # samples per forward in the statistics pass: A's probe outputs wait for B's, so keep them small


CHANNELS_FIRST = ProbeView()


def channel_first(output: Tensor, view: ProbeView = CHANNELS_FIRST) -> Tensor:
    """A probe's output [N, C, *spatial] (or [N, C]; or as `view` says: units last, other permuted axes averaged
    out) with the units first, then the samples."""
    output = output.detach()
    if view.pooled:
        output = output.mean(dim=view.pooled, keepdim=True)
    return output.movedim(view.axis, 0)


class _GroupAccumulator:
    """Running float64 sums and sums of products of one group's units, A's and B's stacked as one vector.

    Per batch and probe, A's and B's outputs are copied, shifted by the first batch's means (so a large mean does
    not swamp the variance when the per-batch product runs in the model's dtype), into one [2·width, samples]
    matrix z, and z·zᵀ — A×A, A×B and B×B in one matmul — is added to the float64 accumulator. Memory is O(width²)
    plus A's probe outputs of one chunk of samples; the shift is undone at the end.
    """

    def __init__(self) -> None:
        self.outputs_a: deque[Tensor] = deque()
        self.count = 0
        self.shift: Tensor | None = None
        self.sums: Tensor | None = None
        self.products: Tensor | None = None

    def add_b(self, view_b: Tensor) -> None:
        """Fold B's probe output (units first), with A's of the same probe call (A ran first), into the sums."""
        view_a = self.outputs_a.popleft()
        width = view_a.shape[0]
        if self.shift is None:
            self.shift = torch.cat([view_a.reshape(width, -1).mean(1), view_b.reshape(width, -1).mean(1)])
            self.sums = torch.zeros(2 * width, dtype=torch.float64, device=view_a.device)
            self.products = torch.zeros(2 * width, 2 * width, dtype=torch.float64, device=view_a.device)
        z = torch.empty(2 * width, view_a[0].numel(), dtype=view_a.dtype, device=view_a.device)
        shift = self.shift.view(-1, *(1,) * (view_a.dim() - 1))
        torch.sub(view_a, shift[:width], out=z[:width].view(view_a.shape))
        torch.sub(view_b, shift[width:], out=z[width:].view(view_b.shape))
        self.count += z.shape[1]
        self.sums += z.sum(dim=1, dtype=torch.float64)
        self.products += z @ z.T

    def result(self) -> GroupStats:
        assert self.shift is not None and self.sums is not None and self.products is not None, "probes never ran"
        w = self.sums.shape[0] // 2
        mean = self.sums / self.count
        cov = self.products / self.count - torch.outer(mean, mean)
        mean = mean + self.shift.double()
        return GroupStats(
            count=self.count,
            mean_a=mean[:w],
            mean_b=mean[w:],
            cov_a=cov[:w, :w],
            cov_b=cov[w:, w:],
            cov_ab=cov[:w, w:],
        )


def _units_to(sink: Callable[[Tensor], None], view: ProbeView) -> Callable[..., None]:
    """A forward hook that hands its module's output, units first, to `sink`."""
    return lambda module, inputs, output: sink(channel_first(output, view))


@torch.no_grad()
def activation_stats(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    groups: Iterable[str] | None = None,
) -> dict[str, GroupStats]:
    """Per-group statistics of A's and B's probe outputs in one eval-mode pass of both models over `batches`.

    Probe outputs are read after both forwards of a batch, so they must not be modified in place by later
    layers (no architecture here does; the streaming test would catch it).
    """
    accumulators = {g: _GroupAccumulator() for g in (spec.probes if groups is None else groups)}
    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    handles = []
    for group, acc in accumulators.items():
        for probe in spec.probes[group]:
            view = spec.probe_views.get(probe, CHANNELS_FIRST)
            handles.append(modules_a[probe].register_forward_hook(_units_to(acc.outputs_a.append, view)))
            handles.append(modules_b[probe].register_forward_hook(_units_to(acc.add_b, view)))
    modes = model_a.training, model_b.training
    model_a.eval()
    model_b.eval()
    try:
        for x, _ in batches:
            for chunk in x.split(STATS_CHUNK):  # eval mode: per-sample, so chunking changes nothing but memory
                model_a(chunk)
                model_b(chunk)
    finally:
        for handle in handles:
            handle.remove()
        model_a.train(modes[0])
        model_b.train(modes[1])
    return {g: acc.result() for g, acc in accumulators.items()}
