"""What aligners, aggregators and repairs may use: the spec, fresh models, and batches of the merge data."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.loader import Batches
from mergebench.data.merge_data import MergeData
from mergebench.spec import PermutationSpec


@dataclasses.dataclass
class MergeContext:
    spec: PermutationSpec
    build_model: Callable[[], nn.Module]
    train: ImageData
    test: ImageData
    info: DatasetInfo
    merge: MergeData
    batch_size: int
    eval_batch_size: int
    device: torch.device
    seed: int
    select_on: str = "val"

    def fit_batches(self, *, shuffle: bool = False, seed: int | None = None, batch_size: int | None = None) -> Batches:
        """Batches of the merge data (no augmentation: merge methods see the data as it is)."""
        return Batches(
            self.train,
            self.merge.fit,
            self.info,
            batch_size or self.batch_size,
            shuffle=shuffle,
            seed=self.seed if seed is None else seed,
        )

    def select_batches(self) -> Batches:
        """Where hyper-parameters are chosen: the validation carve-out, or the test set when select_on=test."""
        if self.select_on == "test":
            return Batches(self.test, torch.arange(len(self.test)), self.info, self.eval_batch_size)
        if self.merge.val.numel() == 0:
            return self.fit_batches(batch_size=self.eval_batch_size)
        return Batches(self.train, self.merge.val, self.info, self.eval_batch_size)

    def seeded_fit_batches(self) -> Batches:
        """The merge data in an order shuffled with the run's seed: every pass that learns or recomputes
        statistics on it (NP, fine-tuning, BN resets, REPAIR) is reproducible run to run."""
        return self.fit_batches(shuffle=True, seed=self.seed)
