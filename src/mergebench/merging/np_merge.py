"""NP Merge (Orozco Camacho et al.): one learned interpolation weight per parameter entry.

α = sigmoid(α_pre) per entry, initialised at 0.5, and W = α⊙W_A + (1−α)⊙W_B' with both sources frozen. The blend
is computed inside the forward pass with `torch.func.functional_call`, so a step costs one forward/backward plus an
elementwise blend: no module is rebuilt and no model is copied per step. With K > 2 models (strategy=all_to_one)
every entry gets K logits and a softmax over them (simplex weights, all starting equal): the joint generalisation
the NP paper set aside for its memory cost, which the diagnostics record.

BatchNorm running statistics are left as the α optimisation's train-mode passes left them: the NP paper resets
them after every merge, which is `repair=reset_bn` (its presets set it); `repair=none` keeps them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from mergebench.checkpoints import load_state
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.merging.loop import learn_blend
from mergebench.merging.registry import AGGREGATORS, Merged
from mergebench.weights import uniform_weights, weighted_state

TENSOR_CHOICES = ("all", "weights_only")


@dataclasses.dataclass
class NPParams:
    epochs: int = 10
    lr: float = 0.01
    init: float = 0.5  # initial α of model A (two models; K > 2 always start equal)
    tensors: str = "all"  # which parameters learn α: all | weights_only (conv/linear kernels; the rest keep init)

    def check(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not 0.0 < self.init < 1.0:
            raise ConfigError(f"init={self.init} must be in (0, 1) (α = sigmoid(α_pre) never reaches 0 or 1)")
        if self.tensors not in TENSOR_CHOICES:
            raise ConfigError(f"tensors={self.tensors!r} is not known; allowed: {', '.join(TENSOR_CHOICES)}")

    def check_models(self, num_models: int) -> None:
        """K > 2 models always start at equal simplex weights, so another init would be silently ignored."""
        if num_models > 2 and self.init != 0.5:
            raise ConfigError(f"init={self.init} only applies to two models; {num_models} start at equal weights")


class ParameterBlend:
    """Per-entry weights over K frozen sources, differentiable in their logits only.

    Two sources: α = sigmoid(logit), W = α⊙A + (1−α)⊙B as `torch.lerp` (α = 1 gives A exactly, α = 0 gives B
    exactly, and autograd saves no new tensor beyond α).
    K sources: w = softmax over the K logits of each entry, W = Σ_k w_k⊙S_k. Tensors not in `learned` keep their
    initial blend, computed once.
    """

    def __init__(self, sources: list[dict[str, Tensor]], learned: list[str], init: float = 0.5) -> None:
        self.num_models = len(sources)
        self.names = list(sources[0])
        frozen = [{n: t.detach() for n, t in s.items()} for s in sources]
        if self.num_models == 2:
            self.sources: dict[str, Tensor | tuple[Tensor, Tensor]] = {n: (frozen[0][n], frozen[1][n]) for n in learned}
            start = math.log(init / (1.0 - init))
            self.logits = {n: torch.full_like(frozen[0][n], start).requires_grad_(True) for n in learned}
            weights = [init, 1.0 - init]
        else:
            self.sources = {n: torch.stack([s[n] for s in frozen]) for n in learned}
            self.logits = {n: torch.zeros_like(self.sources[n]).requires_grad_(True) for n in learned}
            weights = uniform_weights(self.num_models)
        self.fixed = {n: sum(w * s[n] for w, s in zip(weights, frozen)) for n in self.names if n not in self.logits}

    def weights(self, name: str) -> Tensor:
        """α of model A (two models, same shape as the tensor) or the K simplex weights (shape [K, *tensor])."""
        logit = self.logits[name]
        return torch.sigmoid(logit) if self.num_models == 2 else torch.softmax(logit, dim=0)

    def params(self) -> dict[str, Tensor]:
        out = dict(self.fixed)
        for name in self.logits:
            w = self.weights(name)
            if self.num_models == 2:
                a, b = self.sources[name]
                out[name] = torch.lerp(b, a, w)  # one fused kernel, exact at α = 0 and α = 1
            else:
                out[name] = (w * self.sources[name]).sum(dim=0)
        return out

    @torch.no_grad()
    def learned_weights(self) -> dict[str, Tensor]:
        return {n: self.weights(n).detach().clone() for n in self.logits}

    def state_bytes(self) -> int:
        """Bytes the optimisation works on: the sources (views of the models for two, a stacked copy for K), the
        logits, their gradients and Adam's two moments: the part of the memory that grows with K."""
        logits = sum(t.numel() * t.element_size() for t in self.logits.values())
        sources = sum(
            sum(s.numel() * s.element_size() for s in (v if isinstance(v, tuple) else (v,)))
            for v in self.sources.values()
        )
        return sources + 4 * logits


def alpha_statistics(weights: dict[str, Tensor], num_models: int) -> dict[str, list]:
    """Per tensor: [mean, std] of α (two models) or [[means per model], [stds per model]] (K models)."""
    if num_models == 2:
        return {n: [w.mean().item(), w.std(unbiased=False).item()] for n, w in weights.items()}
    return {
        n: [w.flatten(1).mean(1).tolist(), w.flatten(1).std(1, unbiased=False).tolist()] for n, w in weights.items()
    }


def mean_weights(blend: ParameterBlend, fixed_weights: list[float]) -> list[float]:
    """Each model's share of all parameter entries (learned and fixed): the scalar weights REPAIR's goals use."""
    totals, count = torch.zeros(blend.num_models, dtype=torch.float64), 0
    for name in blend.names:
        if name in blend.logits:
            w = blend.weights(name).detach().double()
            per_model = torch.stack([w.sum(), (1 - w).sum()]) if blend.num_models == 2 else w.flatten(1).sum(1)
            totals += per_model.cpu()
            count += w.numel() if blend.num_models == 2 else w[0].numel()
        else:
            n = blend.fixed[name].numel()
            totals += torch.tensor(fixed_weights, dtype=torch.float64) * n
            count += n
    return (totals / max(count, 1)).tolist()


@AGGREGATORS.register("np", NPParams, label="NP-{abbrev}", abbrev="NP")
def aggregate_np(params: NPParams, models: list[nn.Module], ctx: MergeContext) -> Merged:
    num_models = len(models)
    states = [{n: p.detach() for n, p in m.named_parameters()} for m in models]
    learned = [n for n, t in states[0].items() if params.tensors == "all" or t.dim() >= 2]
    blend = ParameterBlend(states, learned, params.init)
    fixed_weights = [params.init, 1.0 - params.init] if num_models == 2 else uniform_weights(num_models)

    net = ctx.build_model()
    load_state(net, weighted_state(models, fixed_weights))  # buffers; parameters come from the blend
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    losses = learn_blend(
        net,
        blend.params,
        blend.logits.values(),
        ctx.seeded_fit_batches(),
        lr=params.lr,
        epochs=params.epochs,
        label=f"NP Merge ({num_models} models)",
    )
    alphas = blend.learned_weights()
    diagnostics = {
        "np_epoch_loss": losses,
        "np_tensors": params.tensors,
        "np_alpha_stats": alpha_statistics(alphas, num_models),
        "np_state_mb": blend.state_bytes() / 2**20,
    }
    if ctx.device.type == "cuda":
        diagnostics["np_peak_mem_mb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    return Merged(net.eval(), mean_weights(blend, fixed_weights), diagnostics, {"np_alpha": alphas})
