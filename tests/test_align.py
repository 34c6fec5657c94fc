"""Aligners on planted problems: B is A with known permutations (or a known invertible mixing), so what an aligner
must return is known exactly; streamed statistics against statistics of all activations at once."""

from __future__ import annotations

import itertools
import types
from copy import deepcopy

import pytest
import torch
from torch import Tensor, nn

import mergebench
from mergebench.align import ALIGNERS
from mergebench.align.activations import activation_stats
from mergebench.align.cca import CCAMaps, CCAParams
from mergebench.align.permute import correlation_matching
from mergebench.align.weight_matching import parameters, rematch_by_weights, weight_matching
from mergebench.context import MergeContext
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.merge_data import MergeData
from mergebench.evaluate import evaluate_batches
from mergebench.merging.strategies import Methods, align_to
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.spec import PermutationSpec, Transform, apply_transforms, random_permutations
from mergebench.weights import mean_model

ARCHS = [
    ("mlp", {"hidden": [32, 24, 16]}, 1, 8),
    ("vgg11", {"width": 0.125}, 3, 16),
    ("resnet20", {"width": 0.25}, 3, 16),
    ("resnet18", {"width": 0.125, "stem": "cifar"}, 3, 16),
]
CASES = [(*arch, norm) for arch in ARCHS for norm in (["bn"] if arch[0] == "resnet18" else ["bn", "layernorm", "none"])]


def build(name: str, params: dict, channels: int, size: int, norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get(name)
    model = entry.factory(to_dataclass(entry.params, {**params, "norm": norm}, "model"), ModelInput(channels, size, 10))
    model.train()
    with torch.no_grad():  # non-trivial BN running statistics, so a forgotten buffer shows
        for _ in range(2):
            model(torch.randn(32, channels, size, size) * 2 + 1)
    return model.eval()


def with_state(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A copy of `model` (same architecture and options) holding `state`."""
    copy = deepcopy(model)
    copy.load_state_dict(state)
    return copy.eval()


def noisy(state: dict[str, Tensor], scale: float, seed: int) -> dict[str, Tensor]:
    """Every float tensor plus Gaussian noise of `scale` × its own standard deviation (running_var kept positive)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point() or v.numel() < 2:
            out[k] = v.clone()
            continue
        out[k] = v + scale * v.std() * torch.randn(v.shape, generator=gen)
        if k.endswith("running_var"):
            out[k] = out[k].abs()
    return out


def inverse(perm: Tensor) -> Tensor:
    return torch.argsort(perm)


def recovered(found: dict[str, Tensor], planted: dict[str, Transform], alive: dict[str, Tensor] | None = None) -> float:
    """Fraction of units matched to where the planted permutation put them (only `alive` units, if given)."""
    hits = total = 0
    for g, tf in planted.items():
        keep = torch.ones_like(tf.perm, dtype=torch.bool) if alive is None else alive[g]
        hits += (found[g] == inverse(tf.perm))[keep].sum().item()
        total += keep.sum().item()
    return hits / total


def logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(("name", "params", "channels", "size", "norm"), CASES)
def test_planted_permutations_are_recovered(name: str, params: dict, channels: int, size: int, norm: str) -> None:
    model_a = build(name, params, channels, size, norm)
    spec = model_a.permutation_spec()
    state_a = model_a.state_dict()
    planted = random_permutations(spec, state_a, seed=1)
    model_b = with_state(model_a, apply_transforms(state_a, spec, planted))
    x = torch.randn(64, channels, size, size)

    # weight matching: exact, and the aligned B is A's function on any input
    perms, info = weight_matching(spec, state_a, model_b.state_dict(), seed=0)
    assert recovered(perms, planted) == 1.0
    assert info["passes"] >= 2 and info["objective"] > info["history"][0]
    aligned = with_state(model_a, apply_transforms(model_b.state_dict(), spec, as_transforms(perms)))
    torch.testing.assert_close(logits(aligned, x), logits(model_a, x), rtol=1e-5, atol=1e-5)

    # activation matching: exact on every unit the data can tell apart; a dead unit (zero on all data, in A and in
    # B alike) is matched to a dead unit by correlation, and, like a tied one, to its own planted copy once
    # rematched by weights
    stats = activation_stats(spec, model_a, model_b, [(x[:40], None), (x[40:], None)])
    match = correlation_matching(stats)
    found, dead, mean_corr = match.perms, match.dead, match.mean_corr
    alive = {g: ~s.dead_a for g, s in stats.items()}
    untied = {
        g: a.clone().index_fill_(0, match.tied.get(g, torch.empty(0, dtype=torch.long)), False)
        for g, a in alive.items()
    }
    assert recovered(found, planted, untied) == 1.0
    for g, s in stats.items():
        assert (~s.dead_b[found[g]]).equal(alive[g])
        assert torch.equal(dead.get(g, torch.empty(0, dtype=torch.long)), torch.nonzero(~alive[g]).flatten())
    assert mean_corr > 0.5
    found = rematch_by_weights(spec, parameters(model_a), parameters(model_b), found, match.unplaced())
    assert recovered(found, planted) == 1.0
    aligned = with_state(model_a, apply_transforms(model_b.state_dict(), spec, as_transforms(found)))
    torch.testing.assert_close(logits(aligned, x), logits(model_a, x), rtol=1e-5, atol=1e-5)

    # small noise on every weight and statistic: still at least 95% of the units
    state_b = noisy(model_b.state_dict(), 0.05, seed=2)
    perms, _ = weight_matching(spec, state_a, state_b, seed=0)
    assert recovered(perms, planted) >= 0.95
    stats = activation_stats(spec, model_a, with_state(model_a, state_b), [(x, None)])
    found = correlation_matching(stats).perms
    assert recovered(found, planted, alive) >= 0.95


def as_transforms(perms: dict[str, Tensor]) -> dict[str, Transform]:
    return {g: Transform.permutation(p) for g, p in perms.items()}


def test_weight_matching_never_decreases_and_restarts_never_hurt() -> None:
    spec_model_a = build("resnet20", {"width": 0.5}, 3, 16, "bn", seed=0)
    spec = spec_model_a.permutation_spec()
    state_a, state_b = spec_model_a.state_dict(), build("resnet20", {"width": 0.5}, 3, 16, "bn", seed=1).state_dict()
    single = weight_matching(spec, state_a, state_b, seed=3)[1]
    history = single["history"]
    assert len(history) >= 3, "independent models need several passes"
    assert all(b >= a for a, b in itertools.pairwise(history))
    assert single["passes"] == len(history) - 1 and single["seconds"] > 0
    several = weight_matching(spec, state_a, state_b, seed=3, restarts=3)[1]
    assert several["objective"] >= single["objective"]
    # the objective is what it claims: Σ ⟨W_A, π(W_B)⟩ over every float tensor the spec maps
    perms = weight_matching(spec, state_a, state_b, seed=3)[0]
    moved = apply_transforms(state_b, spec, as_transforms(perms))
    direct = sum(float((state_a[k].double() * moved[k].double()).sum()) for k, g in spec.axes.items() if any(g))
    assert direct == pytest.approx(single["objective"], rel=1e-9)


def linear_mlp(seed: int) -> nn.Module:
    """The MLP with its ReLUs replaced by identities: linear in every group, so a dense mixing is exact."""
    model = build("mlp", {"hidden": [12, 10, 8]}, 1, 4, "none", seed=seed)
    for i in range(len(model.acts)):
        model.acts[i] = nn.Identity()
    return model.double()


def test_cca_undoes_a_planted_mixing_of_one_group() -> None:
    model_a = linear_mlp(0)
    spec = model_a.permutation_spec()
    gen = torch.Generator().manual_seed(5)
    mixing = torch.randn(10, 10, generator=gen, dtype=torch.float64) + 2 * torch.eye(10)
    model_b = with_state(model_a, apply_transforms(model_a.state_dict(), spec, {"h1": Transform.dense(mixing)}))
    x = torch.randn(400, 1, 4, 4, generator=gen, dtype=torch.float64)
    assert not torch.allclose(model_b.state_dict()["layers.1.weight"], model_a.state_dict()["layers.1.weight"])
    transforms, mean_corr = CCAMaps(activation_stats(spec, model_a, model_b, [(x, None)])).transforms(1e-9)
    assert mean_corr == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(transforms["h1"].matrix, torch.linalg.inv(mixing), rtol=1e-6, atol=1e-6)
    aligned = with_state(model_a, apply_transforms(model_b.state_dict(), spec, transforms))
    state_a, state_aligned = model_a.state_dict(), aligned.state_dict()
    for k in state_a:  # B's weights are A's again, not merely the same function
        torch.testing.assert_close(state_aligned[k], state_a[k], rtol=1e-4, atol=1e-4)
    x_new = torch.randn(50, 1, 4, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(logits(aligned, x_new), logits(model_a, x_new), rtol=1e-4, atol=1e-4)


def all_activations(spec: PermutationSpec, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Every probe output at once as [samples, units] (float64), each spatial position a sample."""
    seen: dict[str, list[Tensor]] = {g: [] for g in spec.probes}
    modules = dict(model.named_modules())
    handles = [
        modules[p].register_forward_hook(lambda m, i, out, g=g: seen[g].append(out.movedim(1, -1).flatten(0, -2)))
        for g, probes in spec.probes.items()
        for p in probes
    ]
    logits(model, x)
    for h in handles:
        h.remove()
    return {g: torch.cat(v) for g, v in seen.items()}


@pytest.mark.parametrize(("name", "params", "size"), [("mlp", {"hidden": [7, 5]}, 3), ("resnet20", {"width": 0.25}, 4)])
def test_streamed_statistics_equal_statistics_of_all_activations(name: str, params: dict, size: int) -> None:
    channels = 1 if name == "mlp" else 3
    model_a = build(name, params, channels, size, "bn", seed=0).double()
    model_b = build(name, params, channels, size, "bn", seed=1).double()
    spec = model_a.permutation_spec()
    x = torch.randn(11, channels, size, size, dtype=torch.float64) * 3 + 5  # large means test the shift
    acts_a, acts_b = all_activations(spec, model_a, x), all_activations(spec, model_b, x)
    splits = [[11], [1, 2, 1, 7], [5, 6]] if name == "resnet20" else [[11], [1] * 11, [4, 3, 4], [10, 1]]
    for split in splits:
        batches = [(chunk, None) for chunk in x.split(split)]
        stats = activation_stats(spec, model_a, model_b, batches)
        for g, s in stats.items():
            a, b = acts_a[g], acts_b[g]
            ca, cb = a - a.mean(0), b - b.mean(0)
            assert s.count == a.shape[0]
            torch.testing.assert_close(s.mean_a, a.mean(0))
            torch.testing.assert_close(s.mean_b, b.mean(0))
            torch.testing.assert_close(s.cov_a, ca.T @ ca / len(a))
            torch.testing.assert_close(s.cov_b, cb.T @ cb / len(b))
            torch.testing.assert_close(s.cov_ab, ca.T @ cb / len(a))
    # residual streams pool all their probes: the stem and every block output of stage 0
    if name == "resnet20":
        assert len(spec.probes["s0"]) == 4


def fake_context(model: nn.Module, channels: int, size: int, n: int = 128) -> MergeContext:
    gen = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen), torch.arange(n) % 10
    )
    info = DatasetInfo("fake", 10, channels, size, (0.5,) * channels, (0.25,) * channels, False)

    def fresh() -> nn.Module:
        return deepcopy(model)

    return MergeContext(
        spec=model.permutation_spec(),
        build_model=fresh,
        train=data,
        test=data,
        info=info,
        merge=MergeData(fit=torch.arange(n - 32), val=torch.arange(n - 32, n)),
        batch_size=32,
        eval_batch_size=48,
        device=torch.device("cpu"),
        seed=0,
    )


def method(name: str, **params: object) -> Methods:
    entry = ALIGNERS.get(name)
    values = to_dataclass(entry.params, params, "align") if entry.params is not None else None
    return Methods(types.SimpleNamespace(factory=entry.factory, params=values), None, None)


@pytest.mark.parametrize(
    ("name", "params", "channels", "size", "norm", "seed"),
    [("mlp", {"hidden": [32, 24, 16]}, 1, 8, "bn", 2), ("resnet20", {"width": 0.25}, 3, 8, "layernorm", 2)],
)
def test_all_to_one_aligns_every_model_to_model_0(
    name: str, params: dict, channels: int, size: int, norm: str, seed: int
) -> None:
    """K = 3 through the registered aligners: models 1 and 2 carry different planted permutations of model 0.

    The seeds give models without dead units on the fake data, so activation-based aligners can (and must)
    recover every unit exactly."""
    model_0 = build(name, params, channels, size, norm, seed)
    spec = model_0.permutation_spec()
    state = model_0.state_dict()
    others = [
        with_state(model_0, apply_transforms(state, spec, random_permutations(spec, state, seed=s))) for s in (1, 2)
    ]
    ctx = fake_context(model_0, channels, size)
    stats = activation_stats(spec, model_0, model_0, ctx.fit_batches())
    assert all((s.std_a > 0).all() for s in stats.values()), "precondition: no dead units"
    for aligner, extra in [("identity", {}), ("permute", {}), ("weight_matching", {}), ("cca", {"gamma": 1e-6})]:
        aligned, diagnostics = align_to(model_0, others, method(aligner, **extra), ctx)
        assert len(aligned) == 3 and aligned[0] is model_0
        assert diagnostics["align_s"] > 0
        for k, model in enumerate(aligned[1:], start=1):
            # every aligner but identity must bring model k's weights back to model 0's (a planted permutation
            # leaves the function unchanged, so it is the weights that tell whether alignment happened)
            target = others[k - 1].state_dict() if aligner == "identity" else state
            for key, value in model.state_dict().items():
                if aligner == "cca" and norm == "bn" and key.endswith("running_var"):
                    continue  # a dense map carries a running variance only approximately (see apply_transforms)
                torch.testing.assert_close(value, target[key], rtol=1e-3, atol=1e-3)
            if aligner != "identity":
                assert diagnostics[f"align{k}_seconds"] > 0
        if aligner == "permute":
            assert diagnostics["align1_mean_corr"] > 0.5
        if aligner == "weight_matching":
            assert {"align1_objective", "align2_passes"} <= set(diagnostics)
        if aligner == "cca":
            assert diagnostics["align1_gamma"] == 1e-6


def test_bad_aligner_parameters_are_one_line_errors() -> None:
    from mergebench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"align\.restarts=0 must be >= 1"):
        to_dataclass(ALIGNERS.get("weight_matching").params, {"restarts": 0}, "align")
    with pytest.raises(ConfigError, match=r"align\.gamma=-1.0 must be > 0"):
        to_dataclass(ALIGNERS.get("cca").params, {"gamma": -1}, "align")
    with pytest.raises(ConfigError, match=r"align\.lr=0.0 must be > 0"):
        to_dataclass(ALIGNERS.get("ste").params, {"lr": 0}, "align")


def test_smoke_shrinks_the_cca_gamma_grid_through_its_params_class() -> None:
    from hydra import compose, initialize_config_dir

    from mergebench.cli import CONF_DIR
    from mergebench.config import validate

    def gamma_grid(*overrides: str) -> list[float]:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return validate(compose("config", overrides=["align=cca", *overrides])).align.params.gamma_grid

    full = gamma_grid()
    assert full == CCAParams().gamma_grid
    assert gamma_grid("smoke=true") == full[::4] == [1e-6, 1e-2, 1e2, 1e6]
    assert CCAParams.smoke({"name": "cca", "gamma": 0.1}) == {"name": "cca", "gamma": 0.1}


def test_cca_searches_gamma_on_validation_data_of_a_bn_net() -> None:
    """γ comes from the grid by the merge's accuracy on the validation carve-out, judged after a BN reset."""
    model_a = build("mlp", {"hidden": [32, 24, 16]}, 1, 8, "bn", seed=2)
    spec = model_a.permutation_spec()
    state = model_a.state_dict()
    model_b = with_state(model_a, apply_transforms(state, spec, random_permutations(spec, state, seed=1)))
    ctx = fake_context(model_a, 1, 8)
    entry = ALIGNERS.get("cca")
    alignment = entry.factory(to_dataclass(entry.params, {}, "align"), [model_a, model_b], ctx)
    diagnostics = alignment.diagnostics
    assert diagnostics["gamma"] in CCAParams().gamma_grid and diagnostics["gamma_searched"]
    assert diagnostics["select_on"] == "val"
    # the merge of A with a perfectly aligned copy of itself is A (statistics reset): the best γ is at least as good
    reference = evaluate_batches(mean_model([state, state], ctx), ctx.select_batches())
    assert diagnostics["select_top1"] >= reference["top1"]


def test_dead_units_are_rematched_when_some_groups_have_no_activations() -> None:
    """Groups without a probe (a segment of a wider output) get no correlation: the rematch of another group's dead
    units holds them in place instead of failing on the missing key (timm regnety_002 with permute did)."""
    model_a = build("mlp", {"hidden": [6, 6]}, 1, 8, "none")
    spec = model_a.permutation_spec()
    state_a = model_a.state_dict()
    planted = random_permutations(spec, state_a, seed=1)
    model_b = with_state(model_a, apply_transforms(state_a, spec, planted))
    first, second = spec.groups[:2]
    truth = {g: torch.argsort(planted[g].perm) for g in (first, second)}
    found = rematch_by_weights(
        spec, parameters(model_a), parameters(model_b), {second: truth[second].flip(0)}, {second: torch.arange(6)}
    )
    assert set(found) == {second}
    with_first = {first: truth[first], second: truth[second].flip(0)}
    fixed = rematch_by_weights(spec, parameters(model_a), parameters(model_b), with_first, {second: torch.arange(6)})
    assert torch.equal(fixed[second], truth[second]) and torch.equal(fixed[first], truth[first])


def test_units_the_data_cannot_tell_apart_are_placed_by_weights() -> None:
    """Eight hidden units each active on one and the same sample correlate 1 with one another (the ResNets' last
    stage on a few small inputs): the data cannot place them, so permute must not trust the tie but rematch them
    by weights, and merges the planted copy back to the very same weights."""
    model = build("mlp", {"hidden": [8]}, 1, 2, "none")
    with torch.no_grad():  # unit i: relu(c_i·x0 - x1), positive only on the sample (1, 0, ., .)
        model.layers[0].weight.copy_(torch.tensor([[0.5 + i / 8, -1.0, 0.0, 0.0] for i in range(8)]))
        model.layers[0].bias.zero_()
    x = torch.cat([torch.tensor([[1.0, 0, 0, 0]]), (torch.rand(31, 4) + 0.1) * torch.tensor([0.0, 1, 1, 1])])
    x = x.reshape(32, 1, 2, 2)
    spec = model.permutation_spec()
    planted = random_permutations(spec, model.state_dict(), seed=3)
    model_b = with_state(model, apply_transforms(model.state_dict(), spec, planted))

    match = correlation_matching(activation_stats(spec, model, model_b, [(x, None)]))
    assert not match.dead and torch.equal(match.tied["h0"], torch.arange(8))
    merged, diagnostics = mergebench.merge([model, model_b], align="permute", agg="avg", data=(x, torch.zeros(32)))
    assert diagnostics["align_tied_units"] == 8
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], tensor, rtol=0, atol=1e-6, msg=key)
