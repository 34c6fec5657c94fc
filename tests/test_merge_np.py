"""Aggregators: scalar averaging, NP Merge (per-entry α through functional_call) and merge-then-finetune."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.func import functional_call

from mergebench.align import ALIGNERS
from mergebench.cli import CONF_DIR
from mergebench.config import Component, validate
from mergebench.data.loader import Batches
from mergebench.errors import ConfigError
from mergebench.evaluate import evaluate_batches
from mergebench.merging import AGGREGATORS, REPAIRS
from mergebench.merging.avg import AvgParams, aggregate_avg
from mergebench.merging.finetune import FinetuneParams, aggregate_finetune
from mergebench.merging.np_merge import NPParams, ParameterBlend, aggregate_np
from mergebench.merging.strategies import Methods, all_to_one
from mergebench.models import MODELS, ModelInput
from mergebench.spec import apply_transforms, random_permutations
from mergebench.weights import reset_bn
from tests.digits_pair import DigitsPair, digits_context, digits_models


def mlp(norm: str = "none", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    params = MODELS.get("mlp").params(hidden=[32, 32], norm=norm)
    return MODELS.get("mlp").factory(params, ModelInput(1, 8, 10))


def component(registry, name: str, **params) -> Component:
    entry, parsed = registry.parse({"name": name, **params})
    return Component(name, entry.factory, parsed)


def merge(pair: DigitsPair, align: str, agg: str, **agg_params) -> nn.Module:
    methods = Methods(component(ALIGNERS, align), component(AGGREGATORS, agg, **agg_params), component(REPAIRS, "none"))
    return all_to_one(None, pair.models, methods, pair.ctx).model


def test_avg_interpolates_every_parameter_and_float_buffer() -> None:
    a, b = mlp("bn", 0), mlp("bn", 1)
    for m, seed in ((a, 2), (b, 3)):  # non-trivial running statistics
        torch.manual_seed(seed)
        m.train()(torch.randn(64, 1, 8, 8))
    ctx = SimpleNamespace(build_model=lambda: mlp("bn"))
    merged = aggregate_avg(AvgParams(alpha=0.3), [a, b], ctx)
    sa, sb, sm = a.state_dict(), b.state_dict(), merged.model.state_dict()
    for key, value in sm.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.3 * sa[key] + 0.7 * sb[key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, sa[key])
    three = aggregate_avg(AvgParams(), [a, b, mlp("bn", 4)], ctx)
    assert three.weights == pytest.approx([1 / 3] * 3)


def test_blend_at_alpha_one_or_zero_is_exactly_a_or_aligned_b() -> None:
    a, b = mlp(seed=0), mlp(seed=1)
    state_b = apply_transforms(
        b.state_dict(), b.permutation_spec(), random_permutations(b.permutation_spec(), b.state_dict(), 0)
    )
    aligned_b = mlp()
    aligned_b.load_state_dict(state_b)
    sources = [dict(a.named_parameters()), dict(aligned_b.named_parameters())]
    blend = ParameterBlend(sources, list(sources[0]))
    net = mlp(seed=5).eval()
    x = torch.randn(16, 1, 8, 8)
    for value, expected in ((float("inf"), a), (float("-inf"), aligned_b)):
        with torch.no_grad():
            for logit in blend.logits.values():
                logit.fill_(value)
            assert torch.equal(functional_call(net, blend.params(), (x,)), expected(x))


def test_gradients_reach_alpha_pre_only() -> None:
    a, b = mlp(seed=0), mlp(seed=1)
    sources = [dict(a.named_parameters()), dict(b.named_parameters())]
    blend = ParameterBlend(sources, list(sources[0]))
    net = mlp(seed=5)
    loss = F.cross_entropy(functional_call(net, blend.params(), (torch.randn(16, 1, 8, 8),)), torch.arange(16) % 10)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in blend.logits.values())
    for model in (a, b, net):
        assert all(p.grad is None for p in model.parameters())
    for pair in blend.sources.values():
        assert all(not s.requires_grad for s in pair)


class Linear2(nn.Module):
    """A bare linear classifier (spec-free: NP Merge needs none)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_np_beats_every_scalar_alpha_when_each_model_knows_half_the_features() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 8, generator=gen) * 3
    noise = torch.randn(3, 8, generator=gen) * 3
    x = torch.randn(2000, 8, generator=gen)
    y = (x @ teacher.T).argmax(1)
    a, b = Linear2(), Linear2()
    with torch.no_grad():  # A is right on features 0-3 and wrong on 4-7; B the other way round
        a.fc.weight.copy_(torch.cat([teacher[:, :4], noise[:, 4:]], 1))
        b.fc.weight.copy_(torch.cat([noise[:, :4], teacher[:, 4:]], 1))
    batches = [(x[i : i + 200], y[i : i + 200]) for i in range(0, 2000, 200)]
    ctx = SimpleNamespace(build_model=Linear2, seeded_fit_batches=lambda: batches, device=torch.device("cpu"))
    merged = aggregate_np(NPParams(epochs=30, lr=0.05), [a, b], ctx).model

    def loss(weight: torch.Tensor) -> float:
        return F.cross_entropy(x @ weight.T, y).item()

    np_loss = loss(merged.fc.weight.detach())
    scalar = [loss(t * a.fc.weight.detach() + (1 - t) * b.fc.weight.detach()) for t in torch.linspace(0, 1, 101)]
    assert np_loss < min(scalar) - 0.1, (np_loss, min(scalar))


@pytest.fixture(scope="module")
def digits_pair() -> DigitsPair:
    return digits_models()


def test_np_p_beats_permute_and_direct_averaging_on_digits(digits_pair: DigitsPair) -> None:
    test = Batches(digits_pair.ctx.test, torch.arange(len(digits_pair.ctx.test)), digits_pair.ctx.info, 1000)
    top1 = {
        label: evaluate_batches(merge(digits_pair, align, agg), test)["top1"]
        for label, align, agg in (
            ("direct", "identity", "avg"),
            ("permute", "permute", "avg"),
            ("np_p", "permute", "np"),
        )
    }
    assert top1["np_p"] > top1["permute"] + 15, top1
    assert top1["np_p"] > top1["direct"] + 15, top1


def test_np_records_and_saves_alpha(digits_pair: DigitsPair, tmp_path) -> None:
    merged = aggregate_np(NPParams(epochs=1), digits_pair.models, digits_pair.ctx)
    alphas = merged.artifacts["np_alpha"]
    params = dict(digits_pair.models[0].named_parameters())
    assert alphas.keys() == params.keys()
    assert all(alphas[n].shape == p.shape and 0 < alphas[n].min() <= alphas[n].max() < 1 for n, p in params.items())
    stats = merged.diagnostics["np_alpha_stats"]
    mean, std = stats["layers.0.weight"]
    assert mean == pytest.approx(alphas["layers.0.weight"].mean().item()) and std > 0
    (path,) = merged.save_artifacts(tmp_path)
    assert path.name == "np_alpha.pt"
    assert torch.equal(torch.load(path)["head.bias"], alphas["head.bias"])
    assert len(merged.diagnostics["np_epoch_loss"]) == 1


def test_np_weights_only_keeps_biases_at_init() -> None:
    a, b = mlp(seed=0), mlp(seed=1)
    ctx = digits_context(mlp)
    merged = aggregate_np(NPParams(epochs=1, tensors="weights_only", init=0.25), [a, b], ctx)
    assert set(merged.artifacts["np_alpha"]) == {n for n, p in a.named_parameters() if p.dim() >= 2}
    expected = 0.25 * a.head.bias + 0.75 * b.head.bias
    torch.testing.assert_close(merged.model.head.bias, expected.detach())


def test_np_with_three_models_learns_simplex_weights_from_equal_start() -> None:
    models = [mlp(seed=s) for s in range(3)]
    ctx = digits_context(mlp)
    untrained = aggregate_np(NPParams(epochs=0), models, ctx)
    mean = sum(m.layers[0].weight for m in models) / 3
    torch.testing.assert_close(untrained.model.layers[0].weight, mean.detach())
    merged = aggregate_np(NPParams(epochs=1), models, ctx)
    weights = merged.artifacts["np_alpha"]["layers.0.weight"]
    assert weights.shape == (3, *models[0].layers[0].weight.shape)
    torch.testing.assert_close(weights.sum(0), torch.ones_like(weights[0]))
    assert weights.std() > 0
    assert merged.diagnostics["np_state_mb"] > 0


@pytest.mark.parametrize(
    ("agg", "params"), [("np", NPParams(epochs=1)), ("finetune", FinetuneParams(epochs=1, lr=1e-3))]
)
def test_batchnorm_statistics_are_reset_by_the_repair_not_the_aggregator(agg: str, params: object) -> None:
    a, b = mlp("bn", 0), mlp("bn", 1)
    ctx = digits_context(lambda: mlp("bn"))

    def merged(repair: str) -> nn.Module:
        chosen = Component(agg, AGGREGATORS.get(agg).factory, params)
        return all_to_one(
            None, [a, b], Methods(component(ALIGNERS, "identity"), chosen, component(REPAIRS, repair)), ctx
        ).model

    kept, repaired = merged("none"), merged("reset_bn")
    fresh = mlp("bn")
    fresh.load_state_dict(kept.state_dict())
    reset_bn(fresh, ctx.seeded_fit_batches())
    torch.testing.assert_close(kept.layers[0].weight, repaired.layers[0].weight)  # the same merge either way
    # repair=reset_bn: the statistics of a fresh reset on the merge data (what NP's presets ask for)
    torch.testing.assert_close(repaired.norms[0].running_mean, fresh.norms[0].running_mean)
    torch.testing.assert_close(repaired.norms[1].running_var, fresh.norms[1].running_var)
    # repair=none: the statistics the aggregator's training left (running averages), not a reset
    assert not torch.allclose(kept.norms[0].running_mean, fresh.norms[0].running_mean, atol=1e-4)
    assert not torch.allclose(kept.norms[1].running_var, fresh.norms[1].running_var, atol=1e-4)
    assert not kept.training and not repaired.training


def merge_data_loss(model: nn.Module, pair: DigitsPair) -> float:
    return evaluate_batches(model, pair.ctx.fit_batches(batch_size=1000))["loss"]


def test_finetune_improves_merge_data_loss_over_plain_averaging(digits_pair: DigitsPair) -> None:
    averaged = merge(digits_pair, "permute", "avg")
    finetuned = merge(digits_pair, "permute", "finetune", epochs=3, lr=1e-3)
    assert merge_data_loss(finetuned, digits_pair) < 0.7 * merge_data_loss(averaged, digits_pair)


def test_finetune_lr_auto_picks_the_best_of_the_grid_on_validation_data(digits_pair: DigitsPair) -> None:
    merged = aggregate_finetune(FinetuneParams(epochs=2, lr_grid=[1e-6, 1e-3]), digits_pair.models, digits_pair.ctx)
    scores = merged.diagnostics["ft_lr_top1"]
    assert merged.diagnostics["ft_lr"] == 1e-3 and scores[1e-3] > scores[1e-6]
    assert merged.diagnostics["ft_lr_selected_on"] == "val"


def compose_validate(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return validate(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["agg=np", "agg.tensors=biases"], "agg.tensors='biases' is not known; allowed: all, weights_only"),
        (["agg=np", "agg.init=1.0"], "agg.init=1.0 must be in (0, 1)"),
        (["agg=finetune", "agg.lr=fast"], "agg.lr='fast' must be a positive number or 'auto'"),
        (["agg=avg", "agg.alpha=0.3", "data.num_models=4"], "agg.alpha=0.3 only applies to two models"),
        (["agg=np", "agg.init=0.3", "data.num_models=3"], "agg.init=0.3 only applies to two models"),
    ],
)
def test_bad_aggregator_settings_fail_with_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_validate(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_scalar_settings_are_fine_when_merging_two_at_a_time() -> None:
    cfg = compose_validate("agg=avg", "agg.alpha=0.3", "data.num_models=4", "strategy=pairwise")
    assert dataclasses.asdict(cfg.agg.params) == {"alpha": 0.3}
    assert compose_validate("agg=finetune", "agg.lr=0.01").agg.params.learning_rates() == [0.01]


def test_method_labels_use_the_papers_names() -> None:
    from mergebench.results import method_label

    cases = {
        ("identity", "avg"): "Direct averaging",
        ("permute", "avg"): "Permute",
        ("weight_matching", "avg"): "Weight Matching",
        ("cca", "avg"): "CCA Merge",
        ("ste", "avg"): "STE",
        ("permute", "finetune"): "Finetune-P",
        ("weight_matching", "finetune"): "Finetune-WM",
        ("permute", "np"): "NP-P",
        ("weight_matching", "np"): "NP-WM",
    }
    assert {key: method_label(*key, "reset_bn") for key in cases} == cases
    assert method_label("permute", "np", "repair") == "NP-P + REPAIR"
    assert method_label("cca", "avg", "repair") == "CCA Merge + REPAIR"


def test_a_run_with_np_saves_alpha_beside_its_results(tmp_path) -> None:
    from mergebench.run import run

    cfg = compose_validate(
        "data=split_classes", "model.hidden=[32]", "train.epochs=2", "align=permute", "agg=np", "agg.epochs=1",
        f"cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    df = run(cfg, tmp_path)
    merged = df[df.model_role == "merged"]
    assert set(merged.method_label) == {"NP-P"}
    alphas = torch.load(tmp_path / "np_alpha.pt")
    assert alphas["layers.0.weight"].shape == (32, 64)
    assert "np_alpha_stats" in merged.diagnostics.iloc[0]


def test_one_selection_rule_ranks_accuracy_then_loss_and_never_picks_a_blown_up_candidate() -> None:
    """CCA's γ, ZipIt!'s α/β and fine-tuning's learning rate are all picked by `selection_key`."""
    from mergebench.evaluate import selection_key

    blown = {"top1": 99.0, "loss": float("nan")}
    candidates = [{"top1": 50.0, "loss": 2.0}, {"top1": 50.0, "loss": 1.0}, blown, {"top1": 10.0, "loss": 0.1}]
    assert max(candidates, key=selection_key) == {"top1": 50.0, "loss": 1.0}
    assert selection_key({"top1": 0.0, "loss": 1e9}) > selection_key({"top1": 100.0, "loss": float("inf")})
