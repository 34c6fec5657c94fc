"""Fisher merging (Matena & Raffel): a per-entry average of the aligned models weighted by each one's diagonal
Fisher information, so an entry a model relies on keeps that model's value.

F_k is the mean over N merge examples of the squared gradient of log p_k(ŷ | x), ŷ sampled from model k's own
predictive distribution (the true Fisher, not the "empirical" one with the data's labels), taken per example with
`torch.func.vmap` in eval mode (BatchNorm uses its running statistics, as the model is used). The merged entry is
Σ_k w_k (F_k + ε) θ_k / Σ_k w_k (F_k + ε): ε keeps entries no model's likelihood touches (dead units) at the plain
weighted average instead of 0/0.

BatchNorm running statistics are buffers, not parameters, and have no Fisher: they are averaged with the weights
w_k; the repair (`reset_bn`, REPAIR) is where statistics are recomputed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mergebench.checkpoints import load_state
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.merging.registry import AGGREGATORS, Merged
from mergebench.weights import interpolation_weights, weighted_state

PER_EXAMPLE_BYTES = 2**28  # memory one vmap chunk of per-example gradients may take (float32 copies of the params)


@dataclasses.dataclass
class FisherParams:
    samples: int = 1000  # N merge examples (one sampled label each); fewer when the merge data is smaller
    eps: float = 1e-8  # added to every Fisher entry: all-zero entries fall back to the weighted average
    alpha: float = 0.5  # w_A (two models; K > 2: w_k = 1/K)
    seed: int | None = None  # label sampling; null = the run's seed

    def check(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples={self.samples} must be >= 1")
        if self.eps < 0:
            raise ConfigError(f"eps={self.eps} must be >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha} must be in [0, 1]")

    def check_models(self, num_models: int) -> None:
        """K > 2 models get equal weights w_k, so another alpha would be silently ignored."""
        if num_models > 2 and self.alpha != 0.5:
            raise ConfigError(f"alpha={self.alpha} only applies to two models; {num_models} get w_k = 1/K")


def fisher_combine(
    params: list[dict[str, Tensor]], fishers: list[dict[str, Tensor]], weights: list[float], eps: float
) -> dict[str, Tensor]:
    """Σ_k w_k (F_k + ε) θ_k / Σ_k w_k (F_k + ε) for every tensor named in `fishers`."""
    out = {}
    for name in fishers[0]:
        scale = [w * (f[name] + eps) for w, f in zip(weights, fishers)]
        out[name] = sum(s * p[name] for s, p in zip(scale, params)) / sum(scale)
    return out


def diagonal_fisher(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], samples: int, generator: torch.Generator
) -> tuple[dict[str, Tensor], int]:
    """The mean squared per-example gradient of log p(ŷ|x) with ŷ ~ p(·|x), over the first `samples` examples of
    `batches`; returns the Fisher of every parameter and the number of examples used."""
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    numel = sum(p.numel() for p in params.values())
    chunk = max(1, min(256, PER_EXAMPLE_BYTES // (4 * numel)))

    def log_likelihood(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return -F.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for x, _ in batches:
        x = x[: samples - seen]
        with torch.no_grad():
            probs = torch.softmax(functional_call(model, (params, buffers), (x,)).float(), dim=1)
        labels = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x.device)
        for start in range(0, len(x), chunk):  # `chunk` examples' gradients at a time: bounded memory
            grads = per_example(params, x[start : start + chunk], labels[start : start + chunk])
            for name, g in grads.items():
                fisher[name] += g.square().sum(0)
        seen += len(x)
        if seen >= samples:
            break
    return {n: f / max(seen, 1) for n, f in fisher.items()}, seen


@AGGREGATORS.register("fisher", FisherParams, label="Fisher-{abbrev}", abbrev="Fisher")
def aggregate_fisher(params: FisherParams, models: list[nn.Module], ctx: MergeContext) -> Merged:
    start = time.perf_counter()
    weights = interpolation_weights(len(models), params.alpha)
    generator = torch.Generator().manual_seed(ctx.seed if params.seed is None else params.seed)
    fishers, used = [], 0
    for model in models:
        fisher, used = diagonal_fisher(model, ctx.seeded_fit_batches(), params.samples, generator)
        fishers.append(fisher)
    sources = [{n: p.detach() for n, p in m.named_parameters()} for m in models]
    state = weighted_state(models, weights)  # buffers: the weighted average; parameters replaced below
    state.update(fisher_combine(sources, fishers, weights, params.eps))
    merged = ctx.build_model()
    load_state(merged, state)
    diagnostics = {
        "fisher_samples": used,
        "fisher_mass": [sum(f.sum().item() for f in fisher.values()) for fisher in fishers],
        "fisher_s": time.perf_counter() - start,
    }
    return Merged(merged.eval(), weights, diagnostics)
