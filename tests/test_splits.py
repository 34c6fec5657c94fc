"""Splits keep the promises of DESIGN §3: exact 80/20 counts, disjoint covering Dirichlet, disjoint classes,
really rotated images, resized cross-dataset pairs, and merge data that never touches the test set."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mergebench.data.datasets import DatasetInfo, ImageData, load_dataset
from mergebench.data.merge_data import MergeDataConfig, select_merge_data
from mergebench.data.splits import SPLITS, DirichletParams, RotatedParams, Split8020Params, SplitRequest, rotate
from mergebench.errors import ConfigError
from mergebench.registry import to_dataclass
from tests.conftest import SHARED_DATA
from tests.fake_data import write_idx, write_usps

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


def test_rotation_is_bilinear_with_zero_fill() -> None:
    white = torch.full((1, 1, 16, 16), 255, dtype=torch.uint8)
    turned = rotate(white, 45.0)
    assert turned[0, 0, 0, 0] == 0 and turned[0, 0, -1, -1] == 0  # corners come from outside: zero fill
    assert (turned[0, 0, 6:10, 6:10] == 255).all()  # the centre stays
    between = ((turned > 0) & (turned < 255)).sum().item()
    assert between > 8  # bilinear blends along the rotated edges (nearest would give only 0 and 255)
    assert torch.equal(rotate(white, 360.0), white)


def test_rotation_interpolation_and_fill_reach_the_pixels() -> None:
    """A pixel on a blended edge differs between bilinear and nearest; `fill` is what enters from outside."""
    image = torch.zeros((1, 1, 4, 4), dtype=torch.uint8)
    image[0, 0, 1, 2] = 200
    bilinear, nearest = rotate(image, 45.0, "bilinear"), rotate(image, 45.0, "nearest")
    assert set(nearest.unique().tolist()) <= {0, 200}  # nearest only copies pixels
    assert 0 < bilinear[0, 0, 1, 1].item() < 200  # bilinear blends the lit pixel into its neighbour
    assert not torch.equal(bilinear, nearest)
    white = torch.full((1, 1, 16, 16), 255, dtype=torch.uint8)
    filled = rotate(torch.zeros_like(white), 45.0, fill=100.0)
    assert filled[0, 0, 0, 0] == 100 and filled[0, 0, 8, 8] == 0  # outside -> fill, inside keeps the image
    with pytest.raises(ConfigError, match="interpolation"):
        rotate(white, 45.0, "lanczos")


def test_rotated_scenario_passes_interpolation_and_fill() -> None:
    b_of = {}
    for mode in ("bilinear", "nearest"):
        s = make("rotated", angle=45.0, interpolation=mode, fill=30.0)
        b_of[mode] = s.train.x[s.clients[1]]
        assert torch.equal(b_of[mode], rotate(s.train.x[s.clients[0]], 45.0, mode, 30.0))
    assert not torch.equal(b_of["bilinear"], b_of["nearest"])
    with pytest.raises(ConfigError, match="interpolation"):
        to_dataclass(RotatedParams, {"angle": 45.0, "interpolation": "area"}, "data")


def _fake_files_loader(root: Path):
    @functools.cache
    def load(name: str) -> tuple[DatasetInfo, ImageData, ImageData]:
        return load_dataset(name, root)

    return load


def test_cross_dataset_usps_mnist_resized_to_28(tmp_path: Path) -> None:
    usps = write_usps(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path, "MNIST", n_train=30, n_test=10)
    load = _fake_files_loader(tmp_path)
    entry = SPLITS.get("cross_dataset")
    params = to_dataclass(entry.params, {"others": ["mnist"], "size": 28}, "data")
    s = entry.factory(params, SplitRequest("usps", load, 2, 0))
    assert s.train.x.shape == (50, 1, 28, 28) and s.test.x.shape == (20, 1, 28, 28)
    assert s.info.size == 28 and s.info.name == "usps+mnist"
    expected = F.interpolate(torch.from_numpy(usps["train"][0]).float(), size=(28, 28), mode="bilinear")
    assert (s.train.x[s.clients[0]].float() - expected.round()).abs().max() <= 1
    assert torch.equal(s.train.y[s.clients[0]], torch.from_numpy(usps["train"][1]))
    assert [c.numel() for c in s.clients] == [20, 30] and s.test_subsets["client_1"].numel() == 10
    # MNIST first: USPS follows MNIST's 28×28 without being told
    default = to_dataclass(entry.params, {"others": ["usps"]}, "data")
    s2 = entry.factory(default, SplitRequest("mnist", load, 2, 0))
    assert s2.train.x.shape[-2:] == (28, 28) and s2.info.name == "mnist+usps"


@pytest.fixture(scope="module")
def real_mnist():
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found at {SHARED_DATA}")
    data = load_dataset("mnist", SHARED_DATA)
    return lambda name: data


def test_real_mnist_80_20_counts(real_mnist) -> None:
    s = SPLITS.get("split_80_20").factory(
        to_dataclass(Split8020Params, {}, "data"), SplitRequest("mnist", real_mnist, 2, 0)
    )
    counts = torch.bincount(s.train.y, minlength=10)
    for cls in range(10):
        small = round(int(counts[cls]) * 0.2)
        got = [int((s.train.y[c] == cls).sum()) for c in s.clients]
        assert got == ([small, int(counts[cls]) - small] if cls < 5 else [int(counts[cls]) - small, small])
    assert sum(c.numel() for c in s.clients) == 60000 and np.intersect1d(s.clients[0], s.clients[1]).size == 0


def test_real_mnist_dirichlet_and_rotated(real_mnist) -> None:
    params = to_dataclass(DirichletParams, {"concentration": 0.5}, "data")
    s = SPLITS.get("dirichlet").factory(params, SplitRequest("mnist", real_mnist, 4, 0))
    everything = torch.cat(s.clients)
    assert everything.numel() == 60000 == torch.unique(everything).numel()
    r = SPLITS.get("rotated").factory(RotatedParams(angle=90.0), SplitRequest("mnist", real_mnist, 2, 0))
    a, b = r.train.x[r.clients[0][:100]], r.train.x[r.clients[1][:100]]
    assert torch.equal(b, torch.rot90(a, k=1, dims=(2, 3))) or torch.equal(b, torch.rot90(a, k=-1, dims=(2, 3)))
    assert len(r.test) == 20000


@pytest.mark.parametrize(("split", "params"), [("split_80_20", {}), ("dirichlet", {}), ("split_classes", {})])
def test_splits_are_functions_of_their_seed(split: str, params: dict) -> None:
    a, b, c = make(split, seed=3, **params), make(split, seed=3, **params), make(split, seed=4, **params)
    assert all(torch.equal(x, y) for x, y in zip(a.clients, b.clients))
    assert not all(torch.equal(x, y) for x, y in zip(a.clients, c.clients))
