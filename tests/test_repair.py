"""reset_bn and REPAIR: a true cumulative BatchNorm reset, REPAIR's statistics goals, exact fusion, and REPAIR
beating plain averaging on a BN-free network."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from mergebench.config import validate
from mergebench.data.datasets import load_dataset
from mergebench.data.loader import Batches
from mergebench.errors import ConfigError
from mergebench.merging.repair import InsertedNorms, channel_stats, goal_stats, repair, repair_sites
from mergebench.models import MODELS, ModelInput
from mergebench.run import run
from mergebench.spec import PermutationSpec
from mergebench.weights import reset_bn, weighted_state

DIGITS = ModelInput(1, 8, 10)


@pytest.fixture(scope="module")
def digits():
    info, train, test = load_dataset("digits", ".")
    return info, train, test


def batches(digits, n: int, batch_size: int, seed: int = 0) -> Batches:
    info, train, _ = digits
    return Batches(train, torch.arange(n), info, batch_size, shuffle=True, seed=seed)


def build(name: str, seed: int, **params) -> nn.Module:
    entry = MODELS.get(name)
    torch.manual_seed(seed)
    return entry.factory(entry.params(**params), DIGITS)


def test_reset_bn_is_a_true_average_independent_of_batch_order(digits) -> None:
    model = build("mlp", 0, hidden=[32, 32], norm="bn")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(9.0)
    other = copy.deepcopy(model)
    reset_bn(model, batches(digits, 512, 64, seed=0))  # 8 equal batches
    reset_bn(other, batches(digits, 512, 64, seed=1))

    info, train, _ = digits
    with torch.no_grad():
        x = next(iter(Batches(train, torch.arange(512), info, 512)))[0]
        exact_mean = model.layers[0](model.flatten(x)).mean(dim=0)
    # equal batches: the mean of batch means is the data mean whatever the order (an EMA would not be)
    torch.testing.assert_close(model.norms[0].running_mean, exact_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other.norms[0].running_mean, exact_mean, atol=1e-5, rtol=1e-5)
    # deeper statistics and variances depend on which samples share a batch only slightly
    for a, b in zip(model.norms, other.norms):
        torch.testing.assert_close(a.running_mean, b.running_mean, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a.running_var, b.running_var, atol=2e-2, rtol=2e-2)
        assert a.momentum == 0.1 and int(a.num_batches_tracked) == 8
        assert not a.running_mean.eq(5.0).any()
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


CASES = [
    ("mlp", {"hidden": [32, 32], "norm": "none"}),
    ("mlp", {"hidden": [32, 32], "norm": "bn"}),
    ("mlp", {"hidden": [32, 32], "norm": "layernorm"}),
    ("vgg11", {"width": 0.125}),
    ("resnet20", {"width": 0.25, "norm": "bn"}),
    ("resnet20", {"width": 0.25, "norm": "layernorm"}),
    ("resnet20", {"width": 0.25, "norm": "none"}),
]


@pytest.mark.parametrize(("arch", "params"), CASES, ids=[f"{a}-{p.get('norm', 'none')}" for a, p in CASES])
def test_repair_reaches_the_goals_and_fusion_keeps_the_logits(digits, arch: str, params: dict) -> None:
    data = batches(digits, 256, 128)
    sources = [build(arch, seed, **params) for seed in (0, 1, 2)]
    for model in sources:
        reset_bn(model, data)  # sensible BatchNorm statistics for random nets
    weights = [0.2, 0.3, 0.5]
    merged = build(arch, 9, **params)
    merged.load_state_dict(weighted_state(sources, weights))
    spec = merged.permutation_spec()
    sites = repair_sites(merged, spec, next(iter(data))[0][:2])
    expected_sites = {"mlp": 2, "vgg11": 8, "resnet20": 21}[arch]  # every conv/linear but the classifier
    assert len(sites) == expected_sites
    assert all((s.norm is None) == (params.get("norm", "none") == "none") for s in sites)

    goals = goal_stats(sites, sources, weights, data)
    inserted = InsertedNorms(merged, sites, goals)
    reset_bn(merged, data, extra=list(inserted.norms.values()))
    x = next(iter(batches(digits, 384, 128, seed=5)))[0]
    with torch.no_grad():
        hooked = merged(x)
        inserted.fuse()
        fused = merged(x)
    assert not any(m._forward_hooks for m in merged.modules())
    torch.testing.assert_close(fused, hooked, atol=1e-5 * hooked.abs().max().item(), rtol=1e-4)

    after = channel_stats(merged, [s.probe for s in sites], data)
    for site in sites:
        goal, got = goals[site.probe], after[site.probe]
        scale = goal.std.clamp_min(1e-3)
        assert ((got.mean - goal.mean).abs() / scale).max() < 0.05, site
        assert ((got.std - goal.std).abs() / scale).max() < 0.05, site


def test_plain_average_misses_the_goals(digits) -> None:
    """The goal check above can fail: without REPAIR the averaged MLP's unit stds collapse below the goals."""
    data = batches(digits, 384, 128)
    sources = [build("mlp", seed, hidden=[32, 32]) for seed in (0, 1)]
    merged = build("mlp", 9, hidden=[32, 32])
    merged.load_state_dict(weighted_state(sources, [0.5, 0.5]))
    sites = repair_sites(merged, merged.permutation_spec(), next(iter(data))[0][:2])
    goals = goal_stats(sites, sources, [0.5, 0.5], data)
    stats = channel_stats(merged, [s.probe for s in sites], data)
    ratio = stats["layers.1"].std / goals["layers.1"].std
    assert ratio.mean() < 0.9


def test_layer_without_bias_or_norm_cannot_be_repaired(digits) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 10))
    spec = PermutationSpec(axes={"1.weight": ("h", None), "3.weight": (None, "h")}, probes={"h": ("2",)})
    with pytest.raises(ConfigError, match=r"correct 1: it has no bias and no norm"):
        repair(model, [model, model], [0.5, 0.5], spec, batches(digits, 128, 64))


def run_digits(tmp: Path, repair_name: str) -> dict[str, float]:
    raw = {
        "name": "t",
        "device": "cpu",
        "cache_dir": str(tmp / "cache"),
        "data": {"name": "same", "dataset": {"name": "digits"}},
        "model": {"name": "mlp", "hidden": [32, 32, 32]},
        "train": {"epochs": 10, "batch_size": 256, "optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0,
                  "warmup_epochs": 0.0, "schedule": "constant", "amp": False},
        "align": {"name": "permute"},
        "agg": {"name": "avg"},
        "repair": {"name": repair_name},
    }  # fmt: skip
    out = tmp / repair_name
    out.mkdir()
    df = run(validate(raw), out)
    rows = df[(df.model_role == "merged") & (df.subset == "test")]
    return dict(zip(rows.metric, rows.value))


def test_repair_beats_plain_permute_on_a_bn_free_mlp(tmp_path: Path) -> None:
    plain = run_digits(tmp_path, "none")
    repaired = run_digits(tmp_path, "repair")  # same base models (cache)
    assert repaired["top1"] > plain["top1"] + 3.0, (plain, repaired)
    assert repaired["loss"] < 0.8 * plain["loss"], (plain, repaired)
