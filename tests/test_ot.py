"""OT fusion: exact OT with equal widths is the linear assignment, different widths give a model of A's widths,
entropic OT tends to exact OT as its regularisation shrinks, and on digits SPLIT it beats direct averaging."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import pandas as pd
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mergebench.align import ALIGNERS
from mergebench.align.ot import OTParams, ot_fusion, transport_plan
from mergebench.align.weight_matching import parameters
from mergebench.errors import ConfigError
from mergebench.models import MODELS, ModelInput
from mergebench.spec import apply_transforms, random_permutations
from tests.digits_pair import digits_context
from tests.test_cli import cli


def mlp(hidden: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get("mlp")
    return entry.factory(entry.params(hidden=hidden, norm="none"), ModelInput(1, 8, 10)).eval()


def rows(state: dict[str, Tensor], layer: int) -> Tensor:
    """A layer's incoming weights and bias, one row per unit."""
    return torch.cat([state[f"layers.{layer}.weight"], state[f"layers.{layer}.bias"][:, None]], 1).double()


def test_exact_ot_with_equal_widths_is_the_linear_assignment() -> None:
    model_a, model_b = mlp([24, 16], 0), mlp([24, 16], 1)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    transforms, info = ot_fusion(model_a.permutation_spec(), parameters(model_a), parameters(model_b))
    # the reference, layer by layer: squared distances of incoming weights, B's inputs already permuted, scipy's LAP
    expected = {}
    _, expected["h0"] = linear_sum_assignment(torch.cdist(rows(state_a, 0), rows(state_b, 0)).pow(2).numpy())
    moved = dict(state_b, **{"layers.1.weight": state_b["layers.1.weight"][:, torch.from_numpy(expected["h0"])]})
    _, expected["h1"] = linear_sum_assignment(torch.cdist(rows(state_a, 1), rows(moved, 1)).pow(2).numpy())
    for group, perm in expected.items():
        assert transforms[group].is_permutation
        assert transforms[group].perm.tolist() == perm.tolist()
        assert sorted(perm.tolist()) != perm.tolist()  # independent models: not the identity
    assert info["solver"] == "emd" and info["cost"] == "weights" and info["dense_groups"] == 0
    assert info["transport_cost"] > 0 and info["seconds"] > 0


def test_exact_ot_undoes_planted_permutations_from_weights_and_from_activations() -> None:
    ctx = digits_context(lambda: mlp([32, 24], 0))
    model_a = mlp([32, 24], 0)
    spec = model_a.permutation_spec()
    planted = random_permutations(spec, model_a.state_dict(), seed=3)
    model_b = deepcopy(model_a)
    model_b.load_state_dict(apply_transforms(model_a.state_dict(), spec, planted))
    x = next(iter(ctx.fit_batches()))[0]
    for cost in ("weights", "acts"):
        alignment = ALIGNERS.get("ot").factory(OTParams(cost=cost), [model_a, model_b], ctx)
        assert alignment.diagnostics["cost"] == cost
        assert alignment.diagnostics["transport_cost"] == pytest.approx(0.0, abs=1e-9)
        aligned = deepcopy(model_a)
        aligned.load_state_dict(apply_transforms(model_b.state_dict(), spec, alignment.transforms[1]))
        with torch.no_grad():  # on the merge data, units dead in A and B alike may be matched to any dead unit
            torch.testing.assert_close(aligned(x), model_a(x))
        if cost == "weights":
            for group, tf in planted.items():
                assert alignment.transforms[1][group].perm.equal(torch.argsort(tf.perm)), group


def test_b_wider_than_a_gives_a_model_of_a_widths_that_runs() -> None:
    model_a, model_b = mlp([16, 12], 0), mlp([32, 24], 1)
    spec = model_a.permutation_spec()
    transforms, info = ot_fusion(spec, parameters(model_a), parameters(model_b))
    assert info["dense_groups"] == 2
    for group, n_a, n_b in [("h0", 16, 32), ("h1", 12, 24)]:
        tf = transforms[group]
        assert tf.matrix.shape == (n_a, n_b) and tf.inverse.shape == (n_b, n_a)
        torch.testing.assert_close(tf.matrix.sum(1), torch.ones(n_a, dtype=torch.float64))
    aligned = deepcopy(model_a)  # B in A's basis is a model of A's architecture
    aligned.load_state_dict(apply_transforms(model_b.state_dict(), spec, transforms))
    merged = deepcopy(model_a)
    merged.load_state_dict({k: (v + aligned.state_dict()[k]) / 2 for k, v in model_a.state_dict().items()})
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in model_a.state_dict().items()}
    x = torch.randn(20, 1, 8, 8)
    assert torch.isfinite(merged(x)).all() and merged(x).shape == (20, 10)


def test_a_twice_as_wide_copies_b_units_and_keeps_b_function() -> None:
    """Integer marginals (each B unit's mass is two A units'): exact OT copies every B unit into two A units, and
    the input side splits its outgoing weights between the copies, so B's function is kept exactly."""
    model_a, model_b = mlp([32, 24], 0), mlp([16, 12], 1)
    spec = model_a.permutation_spec()
    transforms, _ = ot_fusion(spec, parameters(model_a), parameters(model_b))
    for tf in transforms.values():
        assert ((tf.matrix == 0) | (tf.matrix == 1)).all() and (tf.matrix.sum(0) == 2).all()
    aligned = deepcopy(model_a)
    aligned.load_state_dict(apply_transforms(model_b.state_dict(), spec, transforms))
    x = torch.randn(50, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), model_b(x), rtol=1e-5, atol=1e-5)


def test_sinkhorn_tends_to_exact_ot_as_reg_shrinks() -> None:
    cost = torch.rand(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact, none = transport_plan(cost, "emd", 0.0, 1)
    assert none is None
    optimum, gaps = float((exact * cost).sum()), []
    for reg in (1e-1, 1e-2, 1e-3):
        plan, (iterations, _) = transport_plan(cost, "sinkhorn", reg, 20_000)
        assert 0 < iterations <= 20_000
        torch.testing.assert_close(plan.sum(1), torch.full((12,), 1 / 12, dtype=torch.float64), atol=1e-6, rtol=0)
        gaps.append(float((plan * cost).sum()) - optimum)
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-12 and gaps[2] < 1e-3 * optimum, gaps
    # through the aligner: dense maps close to the planted permutation, and the diagnostics
    model_a = mlp([16, 12], 0)
    spec = model_a.permutation_spec()
    planted = random_permutations(spec, model_a.state_dict(), seed=1)
    state_b = apply_transforms(model_a.state_dict(), spec, planted)
    params_b = {k: v for k, v in state_b.items() if k in parameters(model_a)}
    transforms, info = ot_fusion(spec, parameters(model_a), params_b, solver="sinkhorn", reg=1e-2)
    assert info["reg"] == 1e-2 and info["sinkhorn_iterations_max"] > 0 and info["sinkhorn_marginal_error_max"] < 1e-6
    for group, tf in planted.items():
        target = torch.eye(len(tf.perm), dtype=torch.float64)[torch.argsort(tf.perm)]
        found = transforms[group]
        matrix = target if found.is_permutation and found.perm.equal(torch.argsort(tf.perm)) else found.matrix
        assert matrix is not None and (matrix - target).abs().max() < 0.05, group


def test_bad_ot_parameters_are_one_line_errors() -> None:
    from mergebench.registry import to_dataclass

    with pytest.raises(ConfigError, match=r"align\.cost='nope' is not known; allowed: weights, acts"):
        to_dataclass(OTParams, {"cost": "nope"}, "align")
    with pytest.raises(ConfigError, match=r"align\.reg=0.0 must be > 0"):
        to_dataclass(OTParams, {"reg": 0}, "align")


def merged_top1(run_dir: Path) -> float:
    df = pd.read_csv(run_dir / "results.csv")
    row = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    return float(row.value.iloc[0])


def test_ot_beats_direct_averaging_on_digits_split(tmp_path: Path) -> None:
    args = ["data=split_classes", "dataset=digits", "model=mlp", "model.hidden=[128,128]", "train.epochs=10"]
    proc = cli(["-m", "align=identity,ot", *args, "hydra.sweep.dir=outputs/sweep"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    direct, ot = merged_top1(tmp_path / "outputs/sweep/0"), merged_top1(tmp_path / "outputs/sweep/1")
    assert ot > direct + 3, (ot, direct)  # top-1 in %: 30.6 vs 23.4 when written
