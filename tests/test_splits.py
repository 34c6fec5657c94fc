"""Splits keep the promises of DESIGN §3: exact 80/20 counts, disjoint covering Dirichlet, disjoint classes,
really rotated images, resized cross-dataset pairs, and merge data that never touches the test set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mergebench.data.datasets import DatasetInfo, ImageData

from mergebench.data.merge_data import MergeDataConfig, select_merge_data
from mergebench.data.splits import SPLITS, SplitRequest, rotate
from mergebench.errors import ConfigError
from mergebench.registry import to_dataclass

COUNTS = [50, 61, 40, 33, 70, 45, 52, 38, 49, 57]


def fake(name: str = "fake", size: int = 8, counts: list[int] = COUNTS) -> tuple[DatasetInfo, ImageData, ImageData]:
    gen = torch.Generator().manual_seed(len(name))
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.randint(0, 256, (len(y), 1, size, size), generator=gen, dtype=torch.uint8)
    yt = torch.arange(10).repeat(3)
    xt = torch.randint(0, 256, (30, 1, size, size), generator=gen, dtype=torch.uint8)
    info = DatasetInfo(name, 10, 1, size, (0.5,), (0.25,), False)
    return info, ImageData(x, y), ImageData(xt, yt)


def loader(name: str) -> tuple[DatasetInfo, ImageData, ImageData]:
    return fake(name, size=4 if name == "small" else 8)


def make(split: str, k: int = 2, seed: int = 0, **params):
    entry = SPLITS.get(split)
    p = to_dataclass(entry.params, params, "data") if entry.params else None
    return entry.factory(p, SplitRequest("fake", loader, k, seed))


def test_80_20_counts_are_exact() -> None:
    s = make("split_80_20")
    y = s.train.y
    for cls, n in enumerate(COUNTS):
        small = round(n * 0.2)
        c0 = int((y[s.clients[0]] == cls).sum())
        c1 = int((y[s.clients[1]] == cls).sum())
        assert (c0, c1) == ((small, n - small) if cls < 5 else (n - small, small))
    assert set(s.test_subsets) == {"test", "classes_a", "classes_b"}
    assert np.intersect1d(s.clients[0], s.clients[1]).size == 0


@pytest.mark.parametrize("k", [2, 4, 8])
def test_dirichlet_is_disjoint_and_covering(k: int) -> None:
    s = make("dirichlet", k=k, concentration=0.5)
    all_idx = torch.cat(s.clients)
    assert all_idx.numel() == sum(COUNTS) == torch.unique(all_idx).numel()
    # concentration 0.5 is unbalanced: some client's share of some class is far from 1/k
    shares = np.array([[int((s.train.y[c] == cls).sum()) / n for cls, n in enumerate(COUNTS)] for c in s.clients])
    assert np.abs(shares - 1 / k).max() > 0.2
    again = make("dirichlet", k=k, concentration=0.5)
    assert all(torch.equal(a, b) for a, b in zip(s.clients, again.clients))
    other = make("dirichlet", k=k, seed=1, concentration=0.5)
    assert not all(torch.equal(a, b) for a, b in zip(s.clients, other.clients))


def test_dirichlet_large_concentration_is_near_balanced() -> None:
    s = make("dirichlet", k=2, concentration=1e4)
    for cls, n in enumerate(COUNTS):
        assert abs(int((s.train.y[s.clients[0]] == cls).sum()) - n / 2) <= 0.1 * n


def test_split_classes_disjoint() -> None:
    s = make("split_classes")
    classes = [set(s.train.y[c].tolist()) for c in s.clients]
    assert classes[0].isdisjoint(classes[1]) and classes[0] | classes[1] == set(range(10))
    assert len(classes[0]) == 5
    for k, c in enumerate(classes):
        assert sum(COUNTS[i] for i in c) == s.clients[k].numel()
        assert set(s.test.y[s.test_subsets[f"classes_{k}"]].tolist()) == c
    fixed = make("split_classes", classes=[[0, 1], [2, 3, 4]])
    assert set(fixed.train.y[fixed.clients[1]].tolist()) == {2, 3, 4}
    with pytest.raises(ConfigError, match="disjoint"):
        make("split_classes", classes=[[0, 1], [1, 2]])


def test_rotation_is_a_real_rotation() -> None:
    x = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    x[0, 0, 0, 4] = 255  # a dot at the top centre
    quarter = rotate(x, 90.0)
    assert torch.equal(quarter, torch.rot90(x, k=1, dims=(2, 3))) or torch.equal(
        quarter, torch.rot90(x, k=-1, dims=(2, 3))
    )
    assert torch.equal(rotate(x, 0.0), x)
    half = rotate(rotate(x, 90.0), 90.0)
    assert torch.equal(half, torch.rot90(x, k=2, dims=(2, 3)))


def test_rotated_scenario() -> None:
    s = make("rotated", angle=90.0)
    n = sum(COUNTS)
    assert [c.numel() for c in s.clients] == [n, n]
    a, b = s.train.x[s.clients[0]], s.train.x[s.clients[1]]
    assert torch.equal(b, rotate(a, 90.0)) and not torch.equal(a, b)
    assert torch.equal(s.train.y[s.clients[0]], s.train.y[s.clients[1]])
    assert s.test_subsets["client_1"].numel() == 30 and len(s.test) == 60
    with pytest.raises(ConfigError, match="exactly 2"):
        make("rotated", k=3)


def test_cross_dataset_resizes_and_pools() -> None:
    s = make("cross_dataset", others=["small"])
    assert s.train.x.shape[-1] == 8 and len(s.test) == 60
    assert s.info.name == "fake+small"
    with pytest.raises(ConfigError, match="num_models"):
        make("cross_dataset", k=3, others=["small"])


def test_merge_data_per_class_and_validation() -> None:
    s = make("split_classes")
    cfg = to_dataclass(MergeDataConfig, {"per_class": 10, "val_fraction": 0.2}, "merge_data")
    m = select_merge_data(s, cfg)
    both = torch.cat([m.fit, m.val])
    assert both.numel() == 100 and torch.unique(both).numel() == 100
    assert torch.bincount(s.train.y[both], minlength=10).tolist() == [10] * 10
    assert m.val.numel() == 20
    one = select_merge_data(s, to_dataclass(MergeDataConfig, {"source": "1", "val_fraction": 0.0}, "merge_data"))
    assert torch.equal(one.fit, s.clients[1].sort().values)
    with pytest.raises(ConfigError, match=r"merge_data\.source"):
        to_dataclass(MergeDataConfig, {"source": "all"}, "merge_data")
