"""The optimisation loop NP Merge, the learned soup and merge-then-finetune share: Adam on the merge data,
cross-entropy, a progress bar with the loss. Sharing it keeps the NP-vs-finetune cost comparison about the blend
alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mergebench.data.loader import Batches
from mergebench.progress import EpochProgress


def adam_epochs(
    forward: Callable[[Tensor], Tensor],
    tensors: Iterable[Tensor],
    batches: Batches,
    *,
    lr: float,
    epochs: int,
    label: str,
) -> list[float]:
    """Minimise the mean cross-entropy of `forward` over `batches` for `epochs` passes, updating `tensors` in place
    with Adam; returns the mean training loss of every epoch."""
    tensors = list(tensors)
    optimizer = torch.optim.Adam(tensors, lr=lr)
    epoch_losses = []
    with EpochProgress(label, epochs, len(batches)) as progress:
        for epoch in range(epochs):
            total, count = torch.zeros(()), 0  # summed on the device: no host sync per step
            for x, y in batches:
                loss = F.cross_entropy(forward(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total = total.to(loss.device) + loss.detach() * len(y)
                count += len(y)
                progress.step(len(y))
            epoch_losses.append(total.item() / max(count, 1))
            progress.epoch_end(epoch + 1, epoch_losses[-1], lr)
    return epoch_losses


def learn_blend(
    net: nn.Module,
    params: Callable[[], dict[str, Tensor]],
    logits: Iterable[Tensor],
    batches: Batches,
    *,
    lr: float,
    epochs: int,
    label: str,
) -> list[float]:
    """Learn mixing `logits` through `net`'s forward with the parameters `params()` builds from them (recomputed in
    every call, so gradients reach the logits; BatchNorm on batch statistics), then write the final parameters
    into `net`: NP Merge's α and the learned soup's weights. Returns the epochs' losses."""
    net.requires_grad_(False).train()
    losses = adam_epochs(
        lambda x: functional_call(net, params(), (x,)), logits, batches, lr=lr, epochs=epochs, label=label
    )
    with torch.no_grad():
        final = params()
        for name, p in net.named_parameters():
            p.copy_(final[name])
    net.requires_grad_(True)  # a plain model again, as every aggregator returns
    return losses
