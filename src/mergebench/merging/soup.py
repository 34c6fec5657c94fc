"""Learned soup (Wortsman et al.): W = Σ_k w_k θ_k with w = softmax(logits), one weight per model
(`granularity=model`) or per model × parameter tensor (`granularity=layer`, as the model-soups code's per-tensor
α), learned on the merge data with the Adam loop NP Merge uses: the coarse-grained, K-model sibling of NP Merge.

The logits start at 0 (the uniform soup) and the sources stay frozen; the blend is computed inside each forward
with `torch.func.functional_call`, as NP's is. BatchNorm layers run in train mode while the weights are learned
and keep the statistics those passes left (like NP): `repair=reset_bn` recomputes them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from mergebench.checkpoints import load_state
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.merging.loop import learn_blend
from mergebench.merging.registry import AGGREGATORS, Merged
from mergebench.weights import uniform_weights, weighted_state

GRANULARITIES = ("model", "layer")


@dataclasses.dataclass
class SoupParams:
    granularity: str = "model"  # model: one weight per model | layer: one per model and parameter tensor
    epochs: int = 10
    lr: float = 0.1  # a handful of logits: a larger step than NP's per-entry 0.01

    def check(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is not known; allowed: {', '.join(GRANULARITIES)}")
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")


class Soup:
    """Softmax mixing weights over K frozen sources: `logits` is [1, K] (model) or [tensors, K] (layer)."""

    def __init__(self, sources: list[dict[str, Tensor]], granularity: str) -> None:
        self.sources = [{n: t.detach() for n, t in s.items()} for s in sources]
        self.names = list(sources[0])
        rows = 1 if granularity == "model" else len(self.names)
        device = next(iter(sources[0].values())).device
        self.logits = torch.zeros(rows, len(sources), device=device, requires_grad=True)

    def weights(self) -> Tensor:
        return torch.softmax(self.logits, dim=1)

    def params(self) -> dict[str, Tensor]:
        w = self.weights().expand(len(self.names), -1)
        return {name: sum(wk * s[name] for wk, s in zip(w[i], self.sources)) for i, name in enumerate(self.names)}

    @torch.no_grad()
    def per_model(self) -> list[float]:
        """Each model's share of all parameter entries: the scalar weights REPAIR's goals use."""
        w = self.weights().double().cpu()  # [1, K] broadcasts over the tensors like [tensors, K]
        sizes = torch.tensor([self.sources[0][n].numel() for n in self.names], dtype=torch.float64)
        return ((sizes[:, None] * w).sum(0) / sizes.sum()).tolist()


@AGGREGATORS.register("soup", SoupParams, label="Soup-{abbrev}", abbrev="Soup")
def aggregate_soup(params: SoupParams, models: list[nn.Module], ctx: MergeContext) -> Merged:
    soup = Soup([dict(m.named_parameters()) for m in models], params.granularity)
    net = ctx.build_model()
    load_state(net, weighted_state(models, uniform_weights(len(models))))  # buffers; parameters: the soup's
    losses = learn_blend(
        net,
        soup.params,
        [soup.logits],
        ctx.seeded_fit_batches(),
        lr=params.lr,
        epochs=params.epochs,
        label=f"Learned soup ({len(models)} models, per {params.granularity})",
    )
    weights = soup.weights().detach().cpu()
    learned = {"model": weights[0]} if params.granularity == "model" else dict(zip(soup.names, weights))
    diagnostics = {
        "soup_granularity": params.granularity,
        "soup_weights": {n: w.tolist() for n, w in learned.items()},
        "soup_epoch_loss": losses,
    }
    return Merged(net.eval(), soup.per_model(), diagnostics, {"soup_weights": learned})
