"""Images as a model built for other inputs takes them: zoo classifiers expect 3-channel images of some minimum
size, the embedded digits are 1×8×8. `data.dataset.channels` and `data.dataset.size` adapt a dataset once, on its
uint8 tensors, so augmentation, normalisation, the split and every cache key see the adapted images."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.errors import ConfigError


def resize(x: Tensor, size: int) -> Tensor:
    """uint8 images [N, C, H, W] to size×size (bilinear, antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def adapt_channels(x: Tensor, channels: int) -> Tensor:
    """Grayscale repeated to `channels` (a gray image as RGB), or colour averaged to one channel."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return x.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    raise ConfigError(
        f"data.dataset.channels={channels}: images with {x.shape[1]} channels can become 1 channel or keep "
        f"{x.shape[1]}; allowed: null, 1, {x.shape[1]}"
    )


def adapt_inputs(
    info: DatasetInfo, train: ImageData, test: ImageData, channels: int | None, size: int | None
) -> tuple[DatasetInfo, ImageData, ImageData]:
    """The dataset with `channels` channels and `size`×`size` images (None keeps what it has); the per-channel
    mean and std follow the channels, so `normalize=standard` still centres every input channel."""
    if channels is None and size is None:
        return info, train, test
    for key, value in (("channels", channels), ("size", size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"data.dataset.{key}={value!r} must be a positive integer or null (keep the dataset's)")
    channels = channels or info.channels
    size = size or info.size

    def adapt(data: ImageData) -> ImageData:
        return ImageData(resize(adapt_channels(data.x, channels), size), data.y)

    mean, std = info.mean, info.std
    if channels != info.channels:
        mean = (sum(mean) / len(mean),) * channels if channels == 1 or len(mean) == 1 else mean
        std = (sum(std) / len(std),) * channels if channels == 1 or len(std) == 1 else std
    adapted = dataclasses.replace(info, channels=channels, size=size, mean=mean, std=std)
    return adapted, adapt(train), adapt(test)
