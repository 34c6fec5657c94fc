"""Weight matching's objective (parameters only; running statistics permuted but never scored), its start (the
input-to-output sweep) and its end point (no single group's assignment can still raise the objective), checked
against direct float64 computations that share no code with the aligner."""

from __future__ import annotations

import types

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mergebench.align.assignment import assign
from mergebench.align.weight_matching import (
    WeightMatchingParams,
    _Problem,
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
    alignment = align_weight_matching(WeightMatchingParams(), [ref, other], ctx)
    return {g: t.perm for g, t in alignment.transforms[1].items()}, alignment.diagnostics


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


def fresh_cost(spec: PermutationSpec, state_a: dict, state_b: dict, perms: dict, group: str, members=None) -> Tensor:
    """Group `group`'s cost matrix from scratch in float64, the other groups at `perms` (optionally only the listed
    tensor names), sharing no code with the aligner."""
    others = {g: Transform.permutation(p) for g, p in perms.items() if g != group}
    moved = apply_transforms(state_b, spec, others)
    n = len(perms[group])
    cost = torch.zeros(n, n, dtype=torch.float64)
    for key, ax in spec.members(group):
        if key in state_a and (members is None or key in members):
            a = state_a[key].double().movedim(ax, 0).reshape(n, -1)
            cost += a @ moved[key].double().movedim(ax, 0).reshape(n, -1).T
    return cost


def three_axis_problem(dtype: torch.dtype) -> tuple[PermutationSpec, dict[str, Tensor], dict[str, Tensor]]:
    """A made-up net with a tensor on three groups (`bil`: two other groups seen from each one), vectors, and
    tensors that only one group touches, in `dtype`."""
    spec = PermutationSpec(
        axes={
            "inp": ("p", None),
            "inp_bias": ("p",),
            "bil": ("p", "q", "r"),
            "mix": ("q", "r"),
            "scale": ("r",),
            "out": (None, "q", None),
        },
        probes={},
    )
    shapes = {
        "inp": (24, 5),
        "inp_bias": (24,),
        "bil": (24, 20, 16),
        "mix": (20, 16),
        "scale": (16,),
        "out": (3, 20, 2),
    }
    gen = torch.Generator().manual_seed(0)
    a = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    a["scale"], b["scale"] = torch.ones(16, dtype=dtype), torch.ones(16, dtype=dtype)  # a fresh norm scale
    return spec, a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kept_cost_matrices_equal_fresh_ones_after_any_sequence_of_moves(dtype: torch.dtype) -> None:
    """The cost matrices brought up to date by GEMMs over the moved units (one, several, or all of them; a tensor
    with two other groups; the sweep's partial matrices completed later) equal matrices built from scratch, within
    the rounding bound that `gain` trusts — and the sequence takes both the incremental and the rebuild paths."""
    spec, state_a, state_b = three_axis_problem(dtype)
    problem = _Problem(spec, state_a, state_b)
    gen = torch.Generator().manual_seed(1)
    perms = {g: torch.randperm(n, generator=gen) for g, n in problem.sizes.items()}
    versions = {g: problem.new_version() for g in problem.groups}
    # the sweep's matrices: only the tensors whose other groups are settled (here: those on `p` and vectors)
    versions["q"] = versions["r"] = -1
    partial = problem.cost("r", perms, versions, settled=True).clone()
    torch.testing.assert_close(partial, fresh_cost(spec, state_a, state_b, perms, "r", {"scale"}))
    versions["q"], versions["r"] = problem.new_version(), problem.new_version()

    for step in range(60):
        group = problem.groups[step % 3]
        n = problem.sizes[group]
        perm = perms[group].clone()
        if step % 7 == 6:
            perm = torch.randperm(n, generator=gen)  # everything moves: a rebuild
        else:
            i, j = torch.randperm(n, generator=gen)[:2].tolist()
            perm[[i, j]] = perm[[j, i]]  # one swap: an update over two units' columns
        perms[group], versions[group] = perm, problem.new_version()
        for g in problem.groups:
            cost = problem.cost(g, perms, versions, settled=False)
            exact = fresh_cost(spec, state_a, state_b, perms, g)
            bound = problem.costs[g].rho * problem.unit[g] * torch.outer(problem.a_norm[g], problem.b_norm[g])
            assert bool(((cost - exact).abs() <= bound).all()), f"step {step}, group {g}"
            scale = float(exact.abs().max())  # and far within it: float32 GEMMs, not the bound, set the error
            assert float((cost - exact).abs().max()) <= (1e-6 if dtype == torch.float32 else 1e-14) * scale
    assert problem.counts["updates"] > 20 and problem.counts["builds"] > 3 + 5


def reference_weight_matching(spec: PermutationSpec, state_a: dict, state_b: dict, seed: int) -> tuple[dict, dict]:
    """Weight matching as documented, written plainly: every cost from scratch in float64, scipy's LAP, every group
    solved every pass (no skipping, no caches), the same sweep, seeded order, acceptance and stopping rule."""
    groups = [g for g in spec.groups if any(k in state_a for k, _ in spec.members(g))]
    perms = {g: torch.arange(spec.group_size(g, state_a)) for g in groups}

    def objective(p: dict) -> float:
        return scored(spec, state_a, state_b, p)

    def solve(p: dict, group: str, members=None) -> Tensor:
        _, cols = linear_sum_assignment(fresh_cost(spec, state_a, state_b, p, group, members).numpy(), maximize=True)
        return torch.from_numpy(cols)

    history = [objective(perms)]
    swept, settled = dict(perms), set()
    for group in groups:
        members = [
            k
            for k, ax in spec.members(group)
            if k in state_a and all(h is None or h == group or h in settled for h in spec.axes[k])
        ]
        swept[group] = solve(swept, group, members)
        settled.add(group)
    history.append(max(history[0], objective(swept)))
    if history[1] > history[0]:
        perms = swept
    gen = torch.Generator().manual_seed(seed)
    value = history[-1]
    for _ in range(100 - 1):
        before = value
        for i in torch.randperm(len(groups), generator=gen).tolist():
            group = groups[i]
            candidate = solve(perms, group)
            cost = fresh_cost(spec, state_a, state_b, perms, group)
            rows = torch.arange(len(candidate))
            gain = float(cost[rows, candidate].sum() - cost[rows, perms[group]].sum())
            if gain > 0:
                perms[group], value = candidate, value + gain
        history.append(value)
        if value - before < 1e-12 * abs(before):
            break
    return perms, {"objective": objective(perms), "passes": len(history) - 1}


@pytest.mark.parametrize(
    ("name", "params", "channels", "size"),
    [("resnet20", {"width": 0.5}, 3, 8), ("vgg11", {"width": 0.125}, 3, 16)],
)
def test_the_descent_takes_the_reference_path(name: str, params: dict, channels: int, size: int) -> None:
    """Cached matrices, skipped groups, the LAP solver and the rounding bound change no step: the same
    permutations, passes and objective as the plain reference above."""
    model_a, model_b = build(name, params, channels, size, 0), build(name, params, channels, size, 1)
    spec = model_a.permutation_spec()
    state_a, state_b = parameters(model_a), parameters(model_b)
    perms, info = weight_matching(spec, state_a, state_b, seed=2)
    ref_perms, ref = reference_weight_matching(spec, state_a, state_b, seed=2)
    assert info["passes"] == ref["passes"] >= 3
    assert all(perms[g].equal(p) for g, p in ref_perms.items())
    assert info["objective"] == pytest.approx(ref["objective"], rel=1e-12)
    assert info["solves"] > 0 and set(info["phases"]) >= {"setup", "cost", "lap", "gain", "objective"}


def test_lap_solver_finds_scipys_assignments() -> None:
    """PyPI `lap` (used from LAPJV_MIN units on, where installed) returns scipy's optimum; on ties, an optimum."""
    pytest.importorskip("lap")
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 64, 300):
        cost = torch.randn(n, n, generator=gen, dtype=torch.float64) @ torch.randn(n, n, generator=gen).double()
        assert assign(cost, "lap").equal(assign(cost, "scipy"))
    for cost in (torch.zeros(200, 200), torch.ones(200, 200), torch.randint(0, 3, (200, 200), generator=gen)):
        cost = cost.double()
        rows = torch.arange(len(cost))
        assert float(cost[rows, assign(cost, "lap")].sum()) == float(cost[rows, assign(cost, "scipy")].sum())
    model_a = build("resnet20", {"width": 2}, 3, 8, seed=0)  # groups of 32, 64 and 128 units
    spec = model_a.permutation_spec()
    state_a, state_b = parameters(model_a), parameters(build("resnet20", {"width": 2}, 3, 8, seed=1))
    perms, info = weight_matching(spec, state_a, state_b, seed=0, solver="lap", max_passes=4)
    scipy_perms, scipy_info = weight_matching(spec, state_a, state_b, seed=0, solver="scipy", max_passes=4)
    assert all(perms[g].equal(p) for g, p in scipy_perms.items())
    assert info["objective"] == scipy_info["objective"]
