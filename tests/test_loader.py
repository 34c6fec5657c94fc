"""Device batches: a seeded permutation sliced into batches, whole-batch crop+flip, per-dataset normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mergebench.data.datasets import DatasetInfo, ImageData, with_normalize
from mergebench.data.loader import CROP_PADDING, Batches, random_crop_flip
from mergebench.errors import ConfigError

INFO = DatasetInfo("fake", 10, 3, 8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), True)


def data(n: int = 50) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.arange(n))


def epoch(batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def test_shuffled_epochs_cover_every_index_once_and_follow_the_seed() -> None:
    d = data()
    indices = torch.arange(3, 50, 2)
    batches = Batches(d, indices, INFO, batch_size=7, shuffle=True, seed=1)
    assert len(batches) == 4
    _, first = epoch(batches)
    _, second = epoch(batches)
    assert sorted(first.tolist()) == indices.tolist() == sorted(second.tolist())  # labels = indices here
    assert not torch.equal(first, second) and not torch.equal(first, indices)  # a fresh order per pass
    _, same = epoch(Batches(d, indices, INFO, batch_size=7, shuffle=True, seed=1))
    _, other = epoch(Batches(d, indices, INFO, batch_size=7, shuffle=True, seed=2))
    assert torch.equal(first, same) and not torch.equal(first, other)
    assert len(Batches(d, indices, INFO, batch_size=7, drop_last=True)) == 3


def test_normalisation_uses_the_dataset_mean_and_std() -> None:
    d = data()
    x, y = epoch(Batches(d, torch.arange(50), INFO, batch_size=16))
    mean = torch.tensor(INFO.mean).view(1, 3, 1, 1)
    std = torch.tensor(INFO.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (d.x.float() / 255 - mean) / std)
    assert torch.equal(y, d.y) and x.dtype == torch.float32


def test_unit_normalisation_is_x_over_255_and_standard_is_not() -> None:
    """dataset.normalize=unit feeds x/255 (Git Re-Basin, YM): inputs in [0, 1] with the raw mean, not ~0-centred."""
    d = data()
    unit, _ = epoch(Batches(d, torch.arange(50), with_normalize(INFO, "unit"), batch_size=16))
    torch.testing.assert_close(unit, d.x.float() / 255)
    assert unit.min() >= 0 and unit.max() <= 1 and abs(unit.mean().item() - 0.5) < 0.05
    standard, _ = epoch(Batches(d, torch.arange(50), with_normalize(INFO, "standard"), batch_size=16))
    assert standard.min() < 0 and not torch.allclose(standard, unit)
    assert with_normalize(INFO, "unit").input_stats() == ((0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ConfigError, match="normalize"):
        with_normalize(INFO, "minmax")


def _is_crop_flip(out: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether `out` is one padded crop of `image`, flipped horizontally or not."""
    p = CROP_PADDING
    padded = F.pad(image, (p, p, p, p))
    h, w = image.shape[-2:]
    crops = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    return any(torch.equal(out, c) or torch.equal(out, c.flip(-1)) for c in crops)


def test_crop_flip_is_a_whole_batch_op_with_per_sample_offsets() -> None:
    x = data(64).x
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert all(_is_crop_flip(out[i], x[i]) for i in range(len(x)))
    changed = [not torch.equal(out[i], x[i]) for i in range(len(x))]
    assert sum(changed) > 48  # with 81 offsets × 2 flips, almost every sample moves
    again = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(1)))
    # flips really happen: a left-right ramp is mirrored in about half the samples
    ramp = torch.arange(8, dtype=torch.uint8).mul(30).view(1, 1, 1, 8).expand(200, 1, 8, 8).contiguous()
    moved = random_crop_flip(ramp, torch.Generator().manual_seed(3))
    centre = moved[:, 0, 4, 3:5].int()
    mirrored = (centre[:, 0] > centre[:, 1]).float().mean().item()
    assert 0.35 < mirrored < 0.65


def test_augmentation_is_applied_in_batches_and_deterministic_per_seed() -> None:
    d = data()
    plain, _ = epoch(Batches(d, torch.arange(50), INFO, batch_size=16, shuffle=True, seed=5))
    aug, labels = epoch(Batches(d, torch.arange(50), INFO, batch_size=16, shuffle=True, augment=True, seed=5))
    aug_again, labels_again = epoch(
        Batches(d, torch.arange(50), INFO, batch_size=16, shuffle=True, augment=True, seed=5)
    )
    assert torch.equal(aug, aug_again) and torch.equal(labels, labels_again)
    aug_other, _ = epoch(Batches(d, torch.arange(50), INFO, batch_size=16, shuffle=True, augment=True, seed=6))
    assert not torch.equal(aug, aug_other)
    assert not torch.equal(aug, plain)
    mean = torch.tensor(INFO.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(INFO.std).view(1, 3, 1, 1) * 255
    raw = (aug * std + mean).round().to(torch.uint8)
    assert all(_is_crop_flip(raw[i], d.x[labels[i]]) for i in range(len(labels)))
