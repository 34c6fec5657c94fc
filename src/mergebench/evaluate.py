"""Logits once per model on the test set; top-1, top-5 and loss on it and its named subsets; the ensemble."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.loader import Batches


@torch.no_grad()
def logits_and_labels(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """Eval-mode logits (float32, on CPU) and labels of every batch, in order."""
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    return logits, labels


def predict(model: nn.Module, data: ImageData, indices: Tensor, info: DatasetInfo, batch_size: int) -> Tensor:
    """Eval-mode logits for `indices` of `data`, in order."""
    out, _ = logits_and_labels(model, Batches(data, indices, info, batch_size))
    return torch.cat(out) if out else torch.empty(0, info.num_classes)


def evaluate_batches(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Eval-mode top-1, top-5 and mean cross-entropy over `batches` (where merge methods select or score)."""
    logits, labels = logits_and_labels(model, batches)
    return metrics(torch.cat(logits), torch.cat(labels))


def selection_key(result: dict[str, float]) -> tuple[float, float]:
    """How candidates (CCA's γ, ZipIt!'s α/β, fine-tuning's learning rate) are ranked on the selection data:
    accuracy first, then loss; a candidate that blows the merge up (non-finite loss) never wins."""
    if not math.isfinite(result["loss"]):
        return (-math.inf, -math.inf)
    return (result["top1"], -result["loss"])


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
