"""REPAIR (Jordan et al., ICLR 2023), forward-pass variant: give every hidden unit of the merged model the mean
and standard deviation that interpolate its statistics in the source models.

Averaging aligned models shrinks the variance of their hidden units layer after layer ("variance collapse").
REPAIR measures, at every corrected output, the per-channel mean and std of each (aligned) source on the merge
data, sets goals `Σ_k w_k·mean_k` and `Σ_k w_k·std_k` with the merge's weights, hooks a BatchNorm with those
goals as its affine after the merged model's output, resets every BatchNorm (the model's and the inserted) in
one train-mode pass, and folds the inserted ones back into the weights, so the repaired model has the original
architecture.

A corrected output ("site") is every conv/linear layer with a permutation group on its output axis (every
layer but the classifier). When a per-channel affine norm consumes the layer's output, the site is the norm's
output and the correction folds into the norm's affine: on BatchNorm nets that is "reset the statistics, then
correct the affine"; on LayerNorm nets the correction comes after the cross-channel normalisation, where a
per-channel change survives. Without a norm the correction folds into the layer's weight and bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.merging.registry import REPAIRS
from mergebench.models.layers import ChannelLayerNorm
from mergebench.modes import evaluating, forward_hooks
from mergebench.spec import PermutationSpec
from mergebench.weights import has_batchnorm, reset_bn

__all__ = [
    "Goal",
    "InsertedNorms",
    "Site",
    "channel_stats",
    "goal_stats",
    "has_batchnorm",
    "repair",
    "repair_sites",
    "reset_bn",
]

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, ChannelLayerNorm)
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# BatchNorm's default 1e-5 would dominate units whose std is below ~3e-3 (deep layers of small nets) and leave
# them short of their goal; 1e-8 is exact down to stds of ~1e-3 and still keeps a constant unit finite
INSERTED_EPS = 1e-8
BATCHNORM_FOR_DIMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@dataclasses.dataclass(frozen=True)
class Site:
    """One corrected output: the conv/linear `layer`, and the affine `norm` that consumes it, if any."""

    layer: str
    norm: str | None
    channels: int
    dims: int  # dimensions of the output tensor: 2 for [N, C], 4 for [N, C, H, W]

    @property
    def probe(self) -> str:
        """The module whose output is measured and corrected."""
        return self.norm or self.layer


@dataclasses.dataclass(frozen=True)
class Goal:
    """Per-channel mean and std (float64): measured in one model, or the weighted goals for the merged one."""

    mean: Tensor
    std: Tensor


@torch.no_grad()
def repair_sites(model: nn.Module, spec: PermutationSpec, example: Tensor) -> list[Site]:
    """Find every site by tracing one forward pass: which module receives each layer's output tensor."""
    modules = dict(model.named_modules())
    layers = [
        key.removesuffix(".weight")
        for key, groups in spec.axes.items()
        if key.endswith(".weight") and groups and groups[0] is not None
    ]
    layers = [name for name in layers if isinstance(modules.get(name), LAYER_TYPES)]
    outputs: dict[str, Tensor] = {}
    consumers: list[tuple[str, Tensor]] = []
    handles = []
    for name, module in modules.items():
        if name in layers:
            handles.append(module.register_forward_hook(lambda m, i, out, name=name: outputs.setdefault(name, out)))
        if isinstance(module, NORM_TYPES):
            handles.append(module.register_forward_hook(lambda m, i, out, name=name: consumers.append((name, i[0]))))
    training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    sites = []
    for name in layers:
        out = outputs[name]
        norm = next((n for n, inp in consumers if inp is out), None)
        if norm is not None and not _has_affine(modules[norm]):
            raise ConfigError(f"repair=repair cannot correct {name}: the norm {norm} after it has no affine")
        if norm is None and getattr(modules[name], "bias", None) is None:
            raise ConfigError(f"repair=repair cannot correct {name}: it has no bias and no norm after it")
        sites.append(Site(name, norm, out.shape[1], out.dim()))
    return sites


def _has_affine(module: nn.Module) -> bool:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return isinstance(weight, nn.Parameter) and isinstance(bias, nn.Parameter) and weight.dim() == 1


class _Moments:
    """Per-channel float64 sums of one output, shifted by the first batch's means against cancellation."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: Tensor | None = None

    def add(self, output: Tensor) -> None:
        x = output.detach().movedim(1, -1).reshape(-1, output.shape[1]).double()
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.sum = torch.zeros_like(self.shift)
            self.squares = torch.zeros_like(self.shift)
        x = x - self.shift
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.squares += (x * x).sum(dim=0)

    def result(self) -> Goal:
        assert self.shift is not None, "the site never ran"
        mean = self.sum / self.count
        return Goal(self.shift + mean, (self.squares / self.count - mean * mean).clamp_min(0).sqrt())


@torch.no_grad()
def channel_stats(model: nn.Module, probes: Iterable[str], batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Goal]:
    """Per-channel mean and std (population, float64) of each probe module's output over `batches`, eval mode.

    Only O(channels) per probe: REPAIR needs no cross-covariances, unlike the aligners' statistics pass."""
    modules = dict(model.named_modules())
    moments = {p: _Moments() for p in probes}
    hooks = [(modules[p], lambda m, i, out, acc=acc: acc.add(out)) for p, acc in moments.items()]
    with evaluating(model), forward_hooks(hooks):
        for x, _ in batches:
            model(x)
    return {p: acc.result() for p, acc in moments.items()}


def goal_stats(
    sites: Sequence[Site],
    sources: Sequence[nn.Module],
    weights: Sequence[float],
    batches: Iterable[tuple[Tensor, Tensor]],
) -> dict[str, Goal]:
    """Per site (keyed by its probe), `Σ_k w_k·mean_k` and `Σ_k w_k·std_k` of the sources' outputs."""
    probes = [s.probe for s in sites]
    per_source = [channel_stats(model, probes, batches) for model in sources]
    return {
        p: Goal(
            sum(w * stats[p].mean for w, stats in zip(weights, per_source)),
            sum(w * stats[p].std for w, stats in zip(weights, per_source)),
        )
        for p in probes
    }


class InsertedNorms:
    """BatchNorms hooked after every site's output, their affine set to the goals; `fuse` folds them into the
    model's own weights and removes the hooks."""

    def __init__(self, model: nn.Module, sites: Sequence[Site], goals: dict[str, Goal]) -> None:
        self.model = model
        self.sites = list(sites)
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        self.norms: dict[str, nn.modules.batchnorm._BatchNorm] = {}
        self.handles = []
        for site in self.sites:
            norm = BATCHNORM_FOR_DIMS[site.dims](site.channels, eps=INSERTED_EPS, momentum=None).to(device)
            with torch.no_grad():
                norm.weight.copy_(goals[site.probe].std)
                norm.bias.copy_(goals[site.probe].mean)
            self.norms[site.probe] = norm
            hook = modules[site.probe].register_forward_hook(lambda m, i, out, norm=norm: norm(out))
            self.handles.append(hook)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """Fold each inserted norm's eval-mode affine `s·x + t` into the site's affine; remove the hooks."""
        for handle in self.handles:
            handle.remove()
        modules = dict(self.model.named_modules())
        for site in self.sites:
            norm = self.norms[site.probe]
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            target = modules[site.probe]
            target.weight.mul_(scale.view(-1, *[1] * (target.weight.dim() - 1)))
            target.bias.mul_(scale).add_(shift)
        return self.model.eval()


def repair(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    weights: Sequence[float],
    spec: PermutationSpec,
    batches: Iterable[tuple[Tensor, Tensor]],
) -> nn.Module:
    """REPAIR `merged` in place: goals from `sources` with `weights`, one reset pass, fused; eval mode.

    `batches` is iterated once per source and once more for the reset (a `Batches` object, not a generator)."""
    sites = repair_sites(merged, spec, next(iter(batches))[0][:2])
    inserted = InsertedNorms(merged, sites, goal_stats(sites, sources, weights, batches))
    reset_bn(merged, batches, extra=list(inserted.norms.values()))
    return inserted.fuse()


@dataclasses.dataclass
class RepairParams:
    def check_spec(self, info: Mapping[str, Any]) -> None:
        """REPAIR corrects conv/linear outputs read on dim 1: a traced model with channels-last layers is refused."""
        last = info.get("spec_channels_last")
        if last:
            shown = ", ".join(last[:3]) + (f" and {len(last) - 3} more" if len(last) > 3 else "")
            raise ConfigError(
                f"repair=repair corrects conv/linear outputs with their units on dim 1, but {shown} put them last "
                "(channels-last): use repair=reset_bn or repair=none for this model"
            )


@REPAIRS.register("repair", RepairParams, label="{method} + REPAIR")
def repair_repair(
    params: RepairParams, merged: nn.Module, sources: list[nn.Module], weights: list[float], ctx: MergeContext
) -> nn.Module:
    return repair(merged, sources, weights, ctx.spec, ctx.seeded_fit_batches())
