"""Passes over the merge data that aligners (and REPAIR) share.

`activation_stats` runs model A and model B side by side over the batches once, with forward hooks on every
group's probe modules, and streams per-group means, covariances and the A×B cross-covariance into float64
accumulators of size width² — activations are never kept beyond the batch that produced them.
`midpoint` and `evaluate_batches` score a candidate merge where an aligner selects something (CCA's γ, STE's
permutation) on the selection data.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from mergebench.align.spec import PermutationSpec
from mergebench.context import MergeContext
from mergebench.evaluate import metrics
from mergebench.merge.repair import has_batchnorm, reset_bn


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


def unit_samples(output: Tensor) -> Tensor:
    """A probe's output as [samples, units]: channels are dim 1 (the last dim for an MLP's [N, C])."""
    x = output.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


class _Accumulator:
    """Shifted sums and cross products of one group (float64).

    Samples are shifted by the first batch's means before the per-batch products, so float32 products do
    not cancel catastrophically when means are large next to standard deviations; the shift is undone at
    the end. Memory is O(width²) whatever the number of samples.
    """

    def __init__(self) -> None:
        self.count = 0
        self.pending: dict[str, deque[Tensor]] = {}
        self.shift_a: Tensor | None = None
        self.shift_b: Tensor | None = None

    def _shifted(self, output: Tensor, side: str) -> Tensor:
        x = unit_samples(output.detach())
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        shift = getattr(self, f"shift_{side}")
        if shift is None:
            shift = x.mean(dim=0)
            setattr(self, f"shift_{side}", shift)
        return x - shift

    def push_a(self, probe: str, output: Tensor) -> None:
        self.pending.setdefault(probe, deque()).append(self._shifted(output, "a"))

    def add_b(self, probe: str, output: Tensor) -> None:
        """Pair B's output with A's output of the same probe on the same batch and accumulate."""
        a = self.pending[probe].popleft()
        b = self._shifted(output, "b")
        if self.count == 0:
            f64 = {"dtype": torch.float64, "device": a.device}
            self.sum_a = torch.zeros(a.shape[1], **f64)
            self.sum_b = torch.zeros(b.shape[1], **f64)
            self.aa = torch.zeros(a.shape[1], a.shape[1], **f64)
            self.bb = torch.zeros(b.shape[1], b.shape[1], **f64)
            self.ab = torch.zeros(a.shape[1], b.shape[1], **f64)
        self.count += a.shape[0]
        self.sum_a += a.sum(dim=0, dtype=torch.float64)
        self.sum_b += b.sum(dim=0, dtype=torch.float64)
        self.aa += a.T @ a
        self.bb += b.T @ b
        self.ab += a.T @ b

    def result(self) -> GroupStats:
        assert self.shift_a is not None and self.shift_b is not None, "the group's probes never ran"
        n = self.count
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        return GroupStats(
            count=n,
            mean_a=self.shift_a.double() + mean_a,
            mean_b=self.shift_b.double() + mean_b,
            cov_a=self.aa / n - torch.outer(mean_a, mean_a),
            cov_b=self.bb / n - torch.outer(mean_b, mean_b),
            cov_ab=self.ab / n - torch.outer(mean_a, mean_b),
        )


@torch.no_grad()
def activation_stats(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    groups: Iterable[str] | None = None,
) -> dict[str, GroupStats]:
    """Per-group statistics of A's and B's probe outputs in one eval-mode pass of both models over `batches`."""
    accumulators = {g: _Accumulator() for g in (spec.probes if groups is None else groups)}
    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    handles = []
    for group, acc in accumulators.items():
        for probe in spec.probes[group]:
            handles.append(
                modules_a[probe].register_forward_hook(lambda m, i, out, acc=acc, p=probe: acc.push_a(p, out))
            )
            handles.append(
                modules_b[probe].register_forward_hook(lambda m, i, out, acc=acc, p=probe: acc.add_b(p, out))
            )
    modes = model_a.training, model_b.training
    model_a.eval()
    model_b.eval()
    try:
        for x, _ in batches:
            model_a(x)
            model_b(x)
    finally:
        for handle in handles:
            handle.remove()
        model_a.train(modes[0])
        model_b.train(modes[1])
    return {g: acc.result() for g, acc in accumulators.items()}


def midpoint(ctx: MergeContext, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> nn.Module:
    """The plain average of two (aligned) states as a model; BatchNorm statistics are reset on the merge data,
    as the pipeline's reset_bn would, so that a candidate is judged as it would be used."""
    state = {k: 0.5 * (a + state_b[k]) if a.is_floating_point() else a.clone() for k, a in state_a.items()}
    model = ctx.build_model()
    model.load_state_dict(state)
    if has_batchnorm(model):
        reset_bn(model, ctx.fit_batches(shuffle=True, seed=ctx.seed))
    return model.eval()


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Eval-mode top-1, top-5 and mean cross-entropy over `batches`."""
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    return metrics(torch.cat(logits), torch.cat(labels))
