"""Weight matching's objective (parameters only; running statistics permuted but never scored), its start (the
input-to-output sweep) and its end point (no single group's assignment can still raise the objective), checked
against direct float64 computations that share no code with the aligner."""

from __future__ import annotations

import types

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mergebench.align.weight_matching import (
    WeightMatchingParams,
    align_weight_matching,
    parameters,
    weight_matching,
)
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.spec import PermutationSpec, Transform, apply_transforms, random_permutations


def build(name: str, params: dict, channels: int, size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get(name)
    return entry.factory(to_dataclass(entry.params, params, "model"), ModelInput(channels, size, 10)).eval()


def with_running_stats(model: nn.Module, scale: float, seed: int) -> nn.Module:
    """`model` with random positive running statistics of size `scale` in every BN layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(scale * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(scale * torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def align(ref: nn.Module, other: nn.Module, seed: int = 0) -> tuple[dict[str, Tensor], dict]:
    """Through the registered aligner, as a run calls it."""
    ctx = types.SimpleNamespace(spec=ref.permutation_spec(), seed=seed)
    alignment = align_weight_matching(WeightMatchingParams(), ref, other, ctx)
    return {g: t.perm for g, t in alignment.transforms.items()}, alignment.diagnostics


def scored(spec: PermutationSpec, state_a: dict[str, Tensor], state_b: dict[str, Tensor], perms: dict) -> float:
    """Σ ⟨A, π(B)⟩ in float64 over the parameters the spec maps."""
    moved = apply_transforms(state_b, spec, {g: Transform.permutation(p) for g, p in perms.items()})
    return sum(float((state_a[k].double() * moved[k].double()).sum()) for k in state_a if any(spec.axes.get(k, ())))


def test_running_statistics_are_permuted_but_never_scored() -> None:
    arch = ("resnet20", {"width": 0.5}, 3, 8)
    model_a, model_b = build(*arch, seed=0), build(*arch, seed=1)
    spec = model_a.permutation_spec()
    with_running_stats(model_a, 1.0, seed=2), with_running_stats(model_b, 1.0, seed=3)
    perms, info = align(model_a, model_b)

    huge_a, huge_b = build(*arch, seed=0), build(*arch, seed=1)
    with_running_stats(huge_a, 1e4, seed=2), with_running_stats(huge_b, 1e4, seed=3)
    huge_perms, huge_info = align(huge_a, huge_b)
    assert all(huge_perms[g].equal(p) for g, p in perms.items())
    assert huge_info["objective"] == pytest.approx(info["objective"], rel=1e-12)

    # the test can fail: scoring the whole state (running statistics included) picks other permutations
    full_perms, _ = weight_matching(spec, huge_a.state_dict(), huge_b.state_dict(), seed=0)
    assert any(not full_perms[g].equal(p) for g, p in perms.items())

    # the reported objective is the parameters' alone, and B's running statistics moved with their units
    assert info["objective"] == pytest.approx(scored(spec, parameters(model_a), parameters(model_b), perms), rel=1e-9)
    aligned = build(*arch, seed=1)
    transforms = {g: Transform.permutation(p) for g, p in perms.items()}
    aligned.load_state_dict(apply_transforms(model_b.state_dict(), spec, transforms))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(aligned.eval()(x), model_b.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "params", "channels", "size"),
    [("mlp", {"hidden": [48, 40, 32]}, 1, 8), ("vgg11", {"width": 0.125}, 3, 16), ("resnet20", {"width": 0.5}, 3, 8)],
)
def test_descent_ends_where_no_single_group_can_improve(name: str, params: dict, channels: int, size: int) -> None:
    """The cached cost shares and skipped groups change no answer: at the end, each group's own linear assignment
    problem, built here from scratch in float64, has the returned permutation as an optimum."""
    model_a, model_b = build(name, params, channels, size, 0), build(name, params, channels, size, 1)
    spec = model_a.permutation_spec()
    state_a, state_b = parameters(model_a), parameters(model_b)
    perms, info = weight_matching(spec, state_a, state_b, seed=5)
    assert info["objective"] == pytest.approx(scored(spec, state_a, state_b, perms), rel=1e-9)
    transforms = {g: Transform.permutation(p) for g, p in perms.items()}
    for group in perms:
        others = {g: t for g, t in transforms.items() if g != group}
        moved = apply_transforms(state_b, spec, others)  # every group but this one applied
        n = len(perms[group])
        cost = torch.zeros(n, n, dtype=torch.float64)
        for key, ax in spec.members(group):
            if key in state_a:
                a = state_a[key].double().movedim(ax, 0).reshape(n, -1)
                cost += a @ moved[key].double().movedim(ax, 0).reshape(n, -1).T
        rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        best = float(cost[rows, cols].sum())
        current = float(cost[torch.arange(n), perms[group]].sum())
        assert current >= best - 1e-9 * abs(best), f"group {group} could still gain {best - current}"


def test_the_first_pass_sweeps_a_planted_permutation_back_and_counts_as_a_pass() -> None:
    model_a = build("resnet20", {"width": 0.5}, 3, 8, seed=0)
    spec = model_a.permutation_spec()
    state_a = parameters(model_a)
    planted = random_permutations(spec, state_a, seed=4)
    state_b = apply_transforms(state_a, spec, planted)
    perms, info = weight_matching(spec, state_a, state_b, seed=0, max_passes=1)
    assert info["passes"] == 1 and len(info["history"]) == 2
    assert all(perms[g].equal(torch.argsort(t.perm)) for g, t in planted.items())
    assert info["history"][1] == pytest.approx(scored(spec, state_a, state_a, {}), rel=1e-9)


def test_a_warm_start_at_the_optimum_stays_there() -> None:
    """STE's warm start: starting from a converged result, the descent moves nothing and takes one pass."""
    model_a, model_b = build("mlp", {"hidden": [40, 32]}, 1, 8, 0), build("mlp", {"hidden": [40, 32]}, 1, 8, 1)
    spec = model_a.permutation_spec()
    state_a, state_b = parameters(model_a), parameters(model_b)
    perms, info = weight_matching(spec, state_a, state_b, seed=0)
    again, warm = weight_matching(spec, state_a, state_b, seed=1, init=perms)
    assert all(again[g].equal(p) for g, p in perms.items())
    assert warm["passes"] == 1 and warm["objective"] == pytest.approx(info["objective"], rel=1e-12)


def test_start_identity_is_the_reference_descent_without_the_sweep() -> None:
    """`align.start=identity` (Git Re-Basin's descent, to reproduce numbers made with it) skips the sweep: with one
    pass on a planted permutation it cannot recover everything the sweep recovers in its one pass."""
    model_a = build("mlp", {"hidden": [48, 40, 32]}, 1, 8, seed=0)
    spec = model_a.permutation_spec()
    state_a = parameters(model_a)
    state_b = apply_transforms(state_a, spec, random_permutations(spec, state_a, seed=4))
    _, swept = weight_matching(spec, state_a, state_b, seed=0, max_passes=1)
    _, plain = weight_matching(spec, state_a, state_b, seed=0, max_passes=1, sweep=False)
    assert plain["objective"] < swept["objective"]
    assert plain["history"][0] == pytest.approx(swept["history"][0], rel=1e-12)
    with pytest.raises(Exception, match="start='middle'"):
        WeightMatchingParams(start="middle").check()
