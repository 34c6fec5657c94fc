"""Device batches: the dataset lives on the device as uint8; batches are slices with whole-batch augmentation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from mergebench.data.datasets import DatasetInfo, ImageData

CROP_PADDING = 4


def to_device(data: ImageData, device: torch.device | str) -> ImageData:
    return ImageData(data.x.to(device, non_blocking=True), data.y.to(device, non_blocking=True))


def random_crop_flip(x: Tensor, gen: torch.Generator, padding: int = CROP_PADDING) -> Tensor:
    """Random crop with zero padding and horizontal flip for a whole batch, as tensor ops (no per-sample loop)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, out.flip(3), out)


class Batches:
    """Seeded mini-batches over `indices` of an on-device dataset; each pass draws a fresh order."""

    def __init__(
        self,
        data: ImageData,
        indices: Tensor,
        info: DatasetInfo,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.data = data
        self.indices = indices.to(data.x.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.gen = torch.Generator().manual_seed(seed)
        device = data.x.device
        mean, std = info.input_stats()
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        n = self.indices.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=self.gen).to(order.device)]
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.data.x[idx]
            if self.augment:
                x = random_crop_flip(x, self.gen)
            yield (x.float() - self.mean) / self.std, self.data.y[idx]
