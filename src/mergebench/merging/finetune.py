"""Merge-then-finetune (NP's "Finetune-P/WM" baseline): average the aligned models (α = 0.5, K models: the mean),
then train every weight on the same merge data, with the same optimiser and epochs NP Merge gets.

NP tuned the learning rate; here `lr=auto` picks it from `lr_grid` on the validation carve-out of the merge data
(or on the test set with select_on=test, as the papers did), and the results record which. Candidates are scored
with BatchNorm statistics recomputed, as `repair=reset_bn` (NP's setting) would use them; the model returned keeps
the statistics its training left, so `repair=none` means none.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from mergebench.checkpoints import load_state
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.evaluate import evaluate_batches, selection_key
from mergebench.merging.loop import adam_epochs
from mergebench.merging.registry import AGGREGATORS, Merged
from mergebench.weights import has_batchnorm, reset_bn, uniform_weights, weighted_state


@dataclasses.dataclass
class FinetuneParams:
    epochs: int = 10
    lr: Any = "auto"  # a positive number, or auto = the best of lr_grid on the select_on data
    lr_grid: list[float] = dataclasses.field(default_factory=lambda: [1e-5, 1e-4, 1e-3])

    def check(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be >= 0")
        if not self.lr_grid or min(self.lr_grid) <= 0:
            raise ConfigError(f"lr_grid={self.lr_grid} must be a non-empty list of positive learning rates")
        self.learning_rates()

    def learning_rates(self) -> list[float]:
        if self.lr == "auto":
            return list(self.lr_grid)
        try:
            lr = float(self.lr)
        except (TypeError, ValueError):
            lr = -1.0
        if not lr > 0:
            raise ConfigError(f"lr={self.lr!r} must be a positive number or 'auto' (the best of lr_grid)")
        return [lr]


def finetune(start: dict, lr: float, epochs: int, ctx: MergeContext) -> tuple[nn.Module, list[float]]:
    """A fresh model loaded with `start`, every weight trained with Adam on the merge data."""
    net = ctx.build_model()
    load_state(net, start)
    net.train()
    losses = adam_epochs(
        net, net.parameters(), ctx.seeded_fit_batches(), lr=lr, epochs=epochs, label=f"Finetune lr={lr:g}"
    )
    return net.eval(), losses


def score(net: nn.Module, ctx: MergeContext) -> dict[str, float]:
    """Top-1 and loss on the selection data of a copy of `net` with BatchNorm statistics reset on the merge data."""
    candidate = net
    if has_batchnorm(net):
        candidate = reset_bn(copy.deepcopy(net), ctx.seeded_fit_batches())
    return evaluate_batches(candidate, ctx.select_batches())


@AGGREGATORS.register("finetune", FinetuneParams, label="Finetune-{abbrev}", abbrev="Finetune")
def aggregate_finetune(params: FinetuneParams, models: list[nn.Module], ctx: MergeContext) -> Merged:
    weights = uniform_weights(len(models))
    start = weighted_state(models, weights)
    rates = params.learning_rates()
    best, scores = None, {}
    for lr in rates:
        net, losses = finetune(start, lr, params.epochs, ctx)
        key = (0.0, 0.0)
        if len(rates) > 1:
            result = score(net, ctx)
            scores[lr] = result["top1"]
            key = selection_key(result)
        if best is None or key > best[0]:
            best = (key, lr, net, losses)
    _, lr, net, losses = best
    diagnostics = {"ft_lr": lr, "ft_epoch_loss": losses}
    if scores:
        diagnostics.update({"ft_lr_top1": scores, "ft_lr_selected_on": ctx.select_on})
    return Merged(net, weights, diagnostics)
