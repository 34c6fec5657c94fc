"""Logits once per model on the test set; top-1, top-5 and loss on it and its named subsets; the ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.loader import Batches


@torch.no_grad()
def predict(model: nn.Module, data: ImageData, indices: Tensor, info: DatasetInfo, batch_size: int) -> Tensor:
    """Eval-mode logits (float32, on CPU) for `indices` of `data`, in order."""
    model.eval()
    out = [model(x).float().cpu() for x, _ in Batches(data, indices, info, batch_size)]
    return torch.cat(out) if out else torch.empty(0, info.num_classes)


def metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    labels = labels.cpu()
    if labels.numel() == 0:
        return {}
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "top1": (top[:, 0] == labels).float().mean().item() * 100,
        "top5": (top == labels[:, None]).any(dim=1).float().mean().item() * 100,
        "loss": F.cross_entropy(logits, labels).item(),
    }


def subset_metrics(logits: Tensor, labels: Tensor, subsets: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Metrics per named subset of the test set (indices into it)."""
    return {name: metrics(logits[idx], labels.cpu()[idx]) for name, idx in subsets.items()}


def ensemble_logits(all_logits: list[Tensor]) -> Tensor:
    """The ensemble's prediction: the mean of the K models' logits (argmax for top-1)."""
    return torch.stack(all_logits).mean(dim=0)
