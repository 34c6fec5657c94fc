"""ZipIt!: planted problems where the right zip is known (permuted copies, duplicated units, a shared first layer),
partial zipping at both ends, the α/β search, and the `mergebench` command on digits against Direct averaging."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from mergebench.align import ALIGNERS
from mergebench.align.activations import activation_stats
from mergebench.align.registry import Alignment
from mergebench.align.zipit import ZipItParams, ZippedModel, zip_features
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.merging import AGGREGATORS, REPAIRS
from mergebench.merging.registry import Merged
from mergebench.merging.strategies import Methods, StrategyParams, all_to_one, pairwise
from mergebench.registry import Component
from mergebench.spec import apply_transforms, random_permutations
from tests.test_align import build, fake_context, with_state
from tests.test_cli import cli

MLP = ("mlp", {"hidden": [32, 24, 16]}, 1, 8)


def component(registry, name: str, **params: object) -> Component:
    entry, parsed = registry.parse({"name": name, **params})
    return Component(name, entry.factory, parsed)


def zipit(models: list[nn.Module], ctx: MergeContext, **params: object) -> Merged:
    """all_to_one with align=zipit, agg=avg and no repair: the merge exactly as ZipIt! defines it."""
    methods = Methods(component(ALIGNERS, "zipit", **params), component(AGGREGATORS, "avg"), component(REPAIRS, "none"))
    return all_to_one(StrategyParams(), models, methods, ctx)


def joint(models: list[nn.Module], ctx: MergeContext, **params: object) -> Alignment:
    entry, parsed = ALIGNERS.parse({"name": "zipit", **params})
    return entry.factory(parsed, models, ctx)


def assert_no_dead_units(model: nn.Module, ctx: MergeContext) -> None:
    stats = activation_stats(ctx.spec, model, model, ctx.fit_batches())
    assert all((s.std_a > 0).all() for s in stats.values()), "precondition: no dead units"


@pytest.mark.parametrize(
    ("name", "params", "channels", "size", "norm", "seed", "num_models", "alpha"),
    [(*MLP, "bn", 5, 2, 0.3), (*MLP, "none", 5, 3, 1.0), ("resnet20", {"width": 0.25}, 3, 8, "layernorm", 2, 2, 0.3)],
)
def test_permuted_copies_zip_back_to_model_a(
    name: str, params: dict, channels: int, size: int, norm: str, seed: int, num_models: int, alpha: float
) -> None:
    """B (and C) = A with planted permutations of every group: ZipIt! must pair each unit with its copies (the
    only correlations of 1), so the merge is model A itself, weights and function. With three models a merged
    pair must still join its third copy first, which α = 1 keeps at similarity 1."""
    model_a = build(name, params, channels, size, norm, seed)
    spec, state = model_a.permutation_spec(), model_a.state_dict()
    others = [with_state(model_a, apply_transforms(state, spec, random_permutations(spec, state, s))) for s in (1, 2)]
    models = [model_a, *others][:num_models]
    ctx = fake_context(model_a, channels, size)
    assert_no_dead_units(model_a, ctx)
    merged = zipit(models, ctx, alpha=alpha, beta=0.125)
    for key, value in merged.model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=1e-5, atol=1e-5)
    x = next(iter(ctx.fit_batches()))[0]
    torch.testing.assert_close(merged.model(x), model_a(x), rtol=1e-4, atol=1e-4)
    assert merged.diagnostics["align_within_merges"] == 0 and merged.diagnostics["align_objective"] > 0.999
    assert merged.diagnostics["align_zipped_groups"] == len(spec.probes)
    assert merged.diagnostics["align_seconds"] > 0 and merged.diagnostics["align_searched"] is False


def test_duplicated_units_merge_within_the_model_only_when_beta_allows() -> None:
    """Units 0 and 1 of A's first layer are copies (correlation 1; B is unrelated): with a budget (β = 0.125 of 16
    merges per model: one) the first merge joins them — one merged feature, read by both, their mean; with β = 0
    no merge may join two units of one model."""
    model_a = build("mlp", {"hidden": [16, 16]}, 1, 8, "none", seed=2)
    with torch.no_grad():
        model_a.layers[0].weight[1] = model_a.layers[0].weight[0]
        model_a.layers[0].bias[1] = model_a.layers[0].bias[0]
    model_b = build("mlp", {"hidden": [16, 16]}, 1, 8, "none", seed=3)
    ctx = fake_context(model_a, 1, 8)

    allowed = joint([model_a, model_b], ctx, alpha=0.3, beta=0.125)
    assert allowed.diagnostics["within_merges"] >= 1
    merge_a, unmerge_a = allowed.transforms[0]["h0"].matrix, allowed.transforms[0]["h0"].inverse
    feature = int(unmerge_a[0].argmax())
    assert torch.equal(unmerge_a[0], unmerge_a[1])  # units 0 and 1 read the same merged feature
    # K·M_A: the feature averages both copies with one weight (a mean over the units it holds)
    assert merge_a[feature, 0] == merge_a[feature, 1] > 0

    forbidden = joint([model_a, model_b], ctx, alpha=0.3, beta=0.0)
    assert forbidden.diagnostics["within_merges"] == 0
    for transforms in forbidden.transforms:  # every merged feature holds one unit of each model: permutations
        unmerge = transforms["h0"].inverse
        assert (unmerge.sum(dim=0) == 1).all() and (unmerge.sum(dim=1) == 1).all()


def test_zip_features_follows_the_budget_and_the_minimum_rule() -> None:
    """Units 0, 1 of model 0 and 2, 3 of model 1. With a budget the within pair 0~1 (0.9) merges first; the merged
    feature's similarity to 2 is then α·min(0.8, 0.2): 0.2 beats 2~3 (0.15) at α = 1, 0.1 does not at α = 0.5.
    Without a budget each merge joins one unit of each model: 0~2, then 1~3."""
    corr = torch.tensor(
        [[1.0, 0.9, 0.8, 0.1], [0.9, 1.0, 0.2, 0.7], [0.8, 0.2, 1.0, 0.15], [0.1, 0.7, 0.15, 1.0]], dtype=torch.float64
    )
    chain = zip_features(corr, num_models=2, alpha=1.0, beta=1.0)  # budget: one within-model merge per model
    assert chain.values == pytest.approx([0.9, 0.2]) and chain.within == 1 and chain.assign.tolist() == [0, 0, 0, 1]
    held_back = zip_features(corr, num_models=2, alpha=0.5, beta=1.0)
    assert held_back.values == pytest.approx([0.9, 0.15]) and held_back.within == 2
    assert held_back.assign.tolist() == [0, 0, 1, 1]
    without = zip_features(corr, num_models=2, alpha=0.5, beta=0.0)
    assert without.within == 0 and without.values == pytest.approx([0.8, 0.7])
    assert without.assign.tolist() == [0, 1, 0, 1]  # each merged feature: one unit of each model, in model 0's order
    assert without.forced == chain.forced == 0


def shared_first_layer(norm: str) -> tuple[list[nn.Module], MergeContext]:
    """Two unrelated MLPs except that B's first layer (and its norm) is a permutation of A's: the first group
    zips exactly, the later ones do not."""
    model_a = build(*MLP, norm, seed=5)
    model_b = build(*MLP, norm, seed=6)
    spec, state_a = model_a.permutation_spec(), model_a.state_dict()
    permuted = apply_transforms(state_a, spec, random_permutations(spec, state_a, seed=1))
    first = {k: v for k, v in permuted.items() if k.startswith(("layers.0.", "norms.0."))}
    model_b.load_state_dict({**model_b.state_dict(), **first})
    ctx = fake_context(model_a, 1, 8)
    assert_no_dead_units(model_a, ctx)
    return [model_a, model_b], ctx


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_partial_zip_at_the_last_group_is_the_full_merge(norm: str) -> None:
    models, ctx = shared_first_layer(norm)
    full = zipit(models, ctx, alpha=0.3, beta=0.125)
    partial = zipit(models, ctx, alpha=0.3, beta=0.125, stop_at="h2")
    assert isinstance(partial.model, ZippedModel) and not isinstance(full.model, ZippedModel)
    assert partial.diagnostics["align_zipped_groups"] == 3
    x = next(iter(ctx.fit_batches()))[0]
    torch.testing.assert_close(partial.model(x), full.model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_partial_zip_at_the_first_group_is_the_ensemble(norm: str) -> None:
    """Only the first group is zipped — exactly, since B's copy of it is a permutation — and each model's own
    later layers make its head: the mean of the heads' logits is the ensemble's. The full zip is not."""
    models, ctx = shared_first_layer(norm)
    x = next(iter(ctx.fit_batches()))[0]
    ensemble = (models[0](x) + models[1](x)) / 2
    partial = zipit(models, ctx, alpha=0.3, beta=0.125, stop_at="h0")
    assert partial.diagnostics["align_zipped_groups"] == 1 and partial.diagnostics["align_stop_at"] == "h0"
    torch.testing.assert_close(partial.model(x), ensemble, rtol=1e-4, atol=1e-4)
    assert not partial.model.training
    full = zipit(models, ctx, alpha=0.3, beta=0.125)
    assert not torch.allclose(full.model(x), ensemble, rtol=1e-2, atol=1e-2)


def test_stop_at_names_the_groups_where_the_network_can_be_cut() -> None:
    """A name that is not a cut (a residual block's inner units are read beside the skip path) is refused in one
    line that lists the cuts."""
    mlp = build(*MLP, "none", seed=2)
    with pytest.raises(ConfigError, match=r"^align\.stop_at='h9' .*; allowed: h0, h1, h2$"):
        joint([mlp, mlp], fake_context(mlp, 1, 8), stop_at="h9")
    resnet = build("resnet20", {"width": 0.25}, 3, 8, "none")
    inner = next(g for g in resnet.permutation_spec().groups if g not in ("s0", "s1", "s2"))
    with pytest.raises(ConfigError, match=r"; allowed: s0, s1, s2$"):
        joint([resnet, resnet], fake_context(resnet, 3, 8), stop_at=inner)


def test_partial_zip_cannot_be_merged_pairwise() -> None:
    models, ctx = shared_first_layer("none")
    methods = Methods(
        component(ALIGNERS, "zipit", alpha=0.3, beta=0.0, stop_at="h0"),
        component(AGGREGATORS, "avg"),
        component(REPAIRS, "none"),
    )
    with pytest.raises(ConfigError, match="strategy=all_to_one"):
        pairwise(StrategyParams(), models, methods, ctx)


def test_alpha_and_beta_are_chosen_on_the_validation_carve_out() -> None:
    model_a = build("mlp", {"hidden": [16, 16]}, 1, 8, "bn", seed=2)
    model_b = build("mlp", {"hidden": [16, 16]}, 1, 8, "bn", seed=3)
    ctx = fake_context(model_a, 1, 8)
    diagnostics = joint([model_a, model_b], ctx).diagnostics
    grids = ZipItParams()
    assert diagnostics["searched"] and diagnostics["select_on"] == "val"
    assert diagnostics["alpha"] in grids.alpha_grid and diagnostics["beta"] in grids.beta_grid
    # β = 0 with two models never re-merges a feature, so every α gives the same merge: scored once
    assert 1 <= diagnostics["candidates"] <= len(grids.alpha_grid) * (len(grids.beta_grid) - 1) + 1
    fixed = joint([model_a, model_b], ctx, beta=0.0).diagnostics  # only α searched: one distinct merge
    assert fixed["beta"] == 0.0 and fixed["candidates"] == 1


def test_zipit_moves_model_0_too_under_the_one_aligner_contract() -> None:
    """Every aligner takes the K models and returns a transform per model: ZipIt!'s moves model 0 too (a shared
    basis), so it says it does not keep the first model, and MergeMany runs it on all models at once."""
    mlp_a, mlp_b = build(*MLP, "none", seed=5), build(*MLP, "none", seed=6)
    result = joint([mlp_a, mlp_b], fake_context(mlp_a, 1, 8), alpha=0.3, beta=0.0)
    assert len(result.transforms) == 2 and result.transforms[0] and result.transforms[1]
    assert ALIGNERS.get("zipit").factory.keeps_first is False
    assert ALIGNERS.get("permute").factory.keeps_first is True and ALIGNERS.get("c2m3").factory.keeps_first is True


def test_bad_parameters_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"^align\.alpha=0.0 must be in \(0, 1\]"):
        ALIGNERS.parse({"name": "zipit", "alpha": 0})
    with pytest.raises(ConfigError, match=r"^align\.beta_grid=\[-0.5\] must be"):
        ALIGNERS.parse({"name": "zipit", "beta_grid": [-0.5]})


def test_zipit_beats_direct_averaging_on_digits_from_the_command_line(tmp_path: Path) -> None:
    args = ["-m", "align=zipit,identity", "data=split_classes", "dataset=digits", "model=mlp"]
    proc = cli([*args, "model.hidden=[64,64]", f"cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    df = pd.concat(pd.read_csv(p) for p in (tmp_path / "outputs" / "multirun").glob("*/*/*/results.csv"))
    top1 = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    accuracy = dict(zip(top1.method_label, top1.value))
    assert accuracy["ZipIt!"] > accuracy["Direct averaging"] + 5, accuracy
    (diagnostics,) = top1[top1["align"] == "zipit"].diagnostics
    assert '"align_within_merges"' in diagnostics and '"align_select_on": "val"' in diagnostics
