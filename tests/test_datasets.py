"""Readers against small files written in the real on-disk formats: shapes, dtypes, labels and pixel values
round-trip; missing files give one line naming the path; ImageNet-200 is decoded once, then read from the cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mergebench.data import datasets, download
from mergebench.data.datasets import DATASETS, check_available, dataset_names, load_dataset
from mergebench.data.download import can_download
from mergebench.errors import DataNotFoundError
from tests.fake_data import Arrays, write_cifar, write_idx, write_imagefolder, write_usps


def assert_round_trip(name: str, root: Path, written: Arrays, shape: tuple[int, int, int], cache: Path | None = None):
    info, train, test = load_dataset(name, root, cache_dir=cache)
    for data, split in ((train, "train"), (test, "test" if "test" in written else "val")):
        x, y = written[split]
        assert data.x.dtype == torch.uint8 and data.y.dtype == torch.int64
        assert tuple(data.x.shape) == (len(y), *shape)
        assert torch.equal(data.x, torch.from_numpy(x)) and torch.equal(data.y, torch.from_numpy(y))
    assert (info.channels, info.size, info.size) == shape
    return info


def test_cifar10_pickle_batches(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, 10, n_train=50, n_test=20)
    info = assert_round_trip("cifar10", tmp_path, written, (3, 32, 32))
    assert info.num_classes == 10 and info.augment


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, 100, n_train=300, n_test=100)
    assert written["train"][1].max() > 19  # fine labels, not the 20 coarse ones
    info = assert_round_trip("cifar100", tmp_path, written, (3, 32, 32))
    assert info.num_classes == 100


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_gz_or_raw(tmp_path: Path, name: str, folder: str, compress: bool) -> None:
    written = write_idx(tmp_path, folder, n_train=40, n_test=10, compress=compress)
    assert_round_trip(name, tmp_path, written, (1, 28, 28))


def test_usps_bz2_values_and_labels(tmp_path: Path) -> None:
    written = write_usps(tmp_path, n_train=30, n_test=12)
    assert_round_trip("usps", tmp_path, written, (1, 16, 16))
    _, train, _ = load_dataset("usps", tmp_path)
    assert train.x[:, 0, 0, 0].eq(0).all() and train.x[:, 0, -1, -1].eq(255).all()  # -1 -> 0, 1 -> 255
    assert train.y.tolist()[:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # file labels 1..10 -> 0..9


def test_imagenet200_decodes_once_then_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    written = write_imagefolder(root, classes=3, per_class=4)
    info = assert_round_trip("imagenet200", root, written, (3, 64, 64), cache)
    assert info.num_classes == 3  # the class folders found
    assert len(list(cache.glob("imagenet200-*.pt"))) == 1
    assert not list(cache.glob(".*.tmp"))

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(datasets, "_decode", no_decoding)
    assert_round_trip("imagenet200", root, written, (3, 64, 64), cache)
    monkeypatch.undo()
    # a changed image changes the fingerprint: decoded again, into a new cache file
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(
        root / "imagenet200" / "val" / "n00000000" / "img_0.png"
    )
    _, _, val = load_dataset("imagenet200", root, cache_dir=cache)
    assert val.x[0].sum() == 0 and len(list(cache.glob("imagenet200-*.pt"))) == 2


def test_tiny_imagenet_layout_and_resizing(tmp_path: Path) -> None:
    """Tiny ImageNet: train/<wnid>/images/*.JPEG, val/images/* labelled by val_annotations.txt; other sizes resized."""
    base = tmp_path / "tiny-imagenet-200"
    colours = {"n02": (200, 10, 10), "n01": (10, 200, 10)}
    for wnid, colour in colours.items():
        (base / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(base / "train" / wnid / "images" / f"{wnid}_0.png")
    (base / "val" / "images").mkdir(parents=True)
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        Image.new("RGB", (64, 64), colours[wnid]).save(base / "val" / "images" / f"val_{i}.png")
    (base / "val" / "val_annotations.txt").write_text(
        "".join(f"val_{i}.png\t{w}\t0\t0\t63\t63\n" for i, w in enumerate(["n02", "n01", "n02"]))
    )
    info, train, val = load_dataset("imagenet200", tmp_path)
    assert info.num_classes == 2 and train.x.shape == (2, 3, 64, 64)
    assert train.y.tolist() == [0, 1] and val.y.tolist() == [1, 0, 1]  # classes sorted: n01 -> 0, n02 -> 1
    assert train.x[1, :, 10, 10].tolist() == [200, 10, 10]  # resized 32 -> 64, colour kept


def test_digits_is_embedded_and_deterministic() -> None:
    _, train, test = load_dataset("digits", "/nonexistent")
    assert len(train) + len(test) == 1797 and train.x.shape[1:] == (1, 8, 8) and train.x.max() == 255
    _, train2, _ = load_dataset("digits", "/nonexistent")
    assert torch.equal(train.y, train2.y) and set(test.y.tolist()) == set(range(10))


@pytest.mark.parametrize("name", [n for n in dataset_names() if n != "digits"])
def test_missing_files_name_the_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(name, tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message and "data.download=true" in message
    assert f"dataset={name}" in message


def test_partial_files_name_the_missing_one(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10, n_train=50, n_test=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        check_available("cifar10", tmp_path)


@pytest.mark.skipif(can_download("cifar10") is None, reason="torchvision is importable here")
def test_download_without_torchvision_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"pip install mergebench\[vision\]"):
        load_dataset("cifar10", tmp_path, download=True)


def test_every_dataset_has_a_config() -> None:
    conf = Path(__file__).resolve().parents[1] / "conf" / "dataset"
    assert {p.stem for p in conf.glob("*.yaml")} == set(DATASETS.names())


def test_download_goes_through_torchvision_into_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With torchvision present, data.download=true calls its dataset class for both splits, then reads the files."""
    calls = []

    class FakeCIFAR10:  # stands in for torchvision.datasets.CIFAR10, which writes cifar-10-batches-py/
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            if not (Path(root) / "cifar-10-batches-py").exists():
                write_cifar(Path(root), 10, n_train=50, n_test=10)

    monkeypatch.setattr(download, "_torchvision_datasets", lambda: SimpleNamespace(CIFAR10=FakeCIFAR10))
    root = tmp_path / "fresh"
    check_available("cifar10", root, download=True)  # the CLI's pre-flight check lets it through
    _, train, test = load_dataset("cifar10", root, download=True)
    assert calls == [(str(root), True, True), (str(root), False, True)]
    assert len(train) == 50 and len(test) == 10
    load_dataset("cifar10", root, download=True)
    assert len(calls) == 2  # present now: nothing fetched again
