"""K-model strategies: how many alignments and merges each performs, onto what, and that every aligner ×
aggregator × strategy combination runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mergebench.align import ALIGNERS
from mergebench.align.registry import PairAlignment, pairwise_aligner
from mergebench.config import Component
from mergebench.data.merge_data import MergeData
from mergebench.merging import AGGREGATORS, REPAIRS, STRATEGIES
from mergebench.merging.avg import AvgParams, aggregate_avg
from mergebench.merging.strategies import Methods, StrategyParams, all_to_one, merge_many, pairwise
from mergebench.models import MODELS, ModelInput
from mergebench.spec import Transform, random_permutations
from tests.digits_pair import digits_context


def mlp(seed: int = 0, norm: str = "none") -> nn.Module:
    torch.manual_seed(seed)
    params = MODELS.get("mlp").params(hidden=[16, 16], norm=norm)
    return MODELS.get("mlp").factory(params, ModelInput(1, 8, 10)).eval()


class Counting:
    """A fake aligner and aggregator that record what they were given."""

    def __init__(self, permute: bool = False) -> None:
        self.align_calls: list[tuple[nn.Module, nn.Module]] = []
        self.agg_calls: list[list[nn.Module]] = []
        self.permute = permute

    def align_pair(self, params: None, ref: nn.Module, other: nn.Module, ctx) -> PairAlignment:
        self.align_calls.append((ref, other))
        if not self.permute:
            return PairAlignment({})
        return PairAlignment(random_permutations(ctx.spec, other.state_dict(), len(self.align_calls)))

    def aggregate(self, params: AvgParams, models: list[nn.Module], ctx):
        self.agg_calls.append(list(models))
        return aggregate_avg(params, models, ctx)

    def methods(self) -> Methods:
        repair = SimpleNamespace(factory=REPAIRS.get("none").factory, params=None)
        return Methods(
            SimpleNamespace(factory=pairwise_aligner(self.align_pair), params=None),
            SimpleNamespace(factory=self.aggregate, params=AvgParams()),
            repair,
        )


@pytest.fixture(scope="module")
def ctx():
    return digits_context(mlp)


def test_pairwise_with_four_models_performs_three_merges(ctx) -> None:
    models = [mlp(s) for s in range(4)]
    counter = Counting()
    merged = pairwise(StrategyParams(), models, counter.methods(), ctx)
    assert len(counter.align_calls) == 3 and len(counter.agg_calls) == 3
    assert all(len(call) == 2 for call in counter.agg_calls)
    first_level = [id(m) for call in counter.align_calls[:2] for m in call]
    assert sorted(first_level) == sorted(id(m) for m in models)  # two disjoint pairs of the inputs, then the results
    assert not {id(m) for m in counter.align_calls[2]} & {id(m) for m in models}
    assert merged.diagnostics["merges"] == 3
    assert sorted(c for c in merged.diagnostics["merge_tree"] if c.isdigit()) == ["0", "1", "2", "3"]
    torch.testing.assert_close(merged.model.head.weight, sum(m.head.weight for m in models).detach() / 4)


def test_pairwise_order_is_seeded_and_odd_counts_carry_over(ctx) -> None:
    models = [mlp(s) for s in range(5)]
    trees = [pairwise(StrategyParams(order_seed=s), models, Counting().methods(), ctx).diagnostics for s in (1, 1, 2)]
    assert trees[0]["merge_tree"] == trees[1]["merge_tree"]
    assert trees[0]["merges"] == 4


def test_all_to_one_aligns_every_other_model_to_model_zero(ctx) -> None:
    models = [mlp(s) for s in range(4)]
    counter = Counting()
    all_to_one(StrategyParams(), models, counter.methods(), ctx)
    assert [ref is models[0] for ref, _ in counter.align_calls] == [True] * 3
    assert [other for _, other in counter.align_calls] == models[1:]
    assert len(counter.agg_calls) == 1 and len(counter.agg_calls[0]) == 4


def test_only_all_to_one_hands_the_curve_models_aligned_to_model_zero(ctx) -> None:
    models = [mlp(s) for s in range(2)]
    counter = Counting(permute=True)
    kept = all_to_one(StrategyParams(), models, counter.methods(), ctx).aligned_to_first
    assert len(kept) == 2 and kept[0] is models[0] and kept[1] is counter.agg_calls[0][1]
    assert kept[1] is not models[1] and not torch.equal(kept[1].layers[0].weight, models[1].layers[0].weight)
    for strategy in (pairwise, merge_many):  # model 0 was not the one reference: the curve aligns B to A itself
        assert strategy(StrategyParams(), models, Counting(permute=True).methods(), ctx).aligned_to_first == []


def test_merge_many_aligns_each_model_to_the_average_of_the_others(ctx) -> None:
    models = [mlp(s) for s in range(3)]
    counter = Counting(permute=True)
    merge_many(StrategyParams(rounds=2), models, counter.methods(), ctx)
    assert len(counter.align_calls) == 6 and len(counter.agg_calls) == 1
    ref, other = counter.align_calls[0]
    others = [m for m in models if m is not other]
    torch.testing.assert_close(ref.head.weight, (others[0].head.weight + others[1].head.weight).detach() / 2)
    settled = Counting(permute=False)  # nothing moves: one round is enough
    result = merge_many(StrategyParams(rounds=5), models, settled.methods(), ctx)
    assert len(settled.align_calls) == 3 and result.diagnostics["rounds"] == 1


def component(registry, name: str, **params) -> Component:
    entry, parsed = registry.parse({"name": name, **params})
    return Component(name, entry.factory, parsed)


ALIGN_FAST = {"ste": {"epochs": 1}, "weight_matching": {}, "permute": {}, "cca": {}, "identity": {}}
AGG_FAST = {"avg": {}, "np": {"epochs": 1}, "finetune": {"epochs": 1, "lr": 1e-3}}


@pytest.mark.parametrize("strategy", STRATEGIES.names())
@pytest.mark.parametrize("agg", AGGREGATORS.names())
@pytest.mark.parametrize("align", ALIGNERS.names())
def test_every_aligner_aggregator_and_strategy_combination_merges(align: str, agg: str, strategy: str) -> None:
    small = digits_context(lambda: mlp(norm="bn"), batch_size=100)
    small.merge = MergeData(fit=small.merge.fit[:300], val=small.merge.val[:60])
    models = [mlp(s, "bn") for s in range(3)]
    methods = Methods(
        component(ALIGNERS, align, **ALIGN_FAST.get(align, {})),
        component(AGGREGATORS, agg, **AGG_FAST.get(agg, {})),
        component(REPAIRS, "reset_bn"),
    )
    merged = STRATEGIES.get(strategy).factory(StrategyParams(rounds=2), models, methods, small)
    x = next(iter(small.fit_batches()))[0]
    assert torch.isfinite(merged.model(x)).all() and not merged.model.training


def test_unknown_strategy_and_bad_rounds_fail_clearly() -> None:
    from mergebench.errors import ConfigError

    allowed = "all_to_one, merge_many, pairwise"
    with pytest.raises(ConfigError, match=rf"^strategy='star' is not known; allowed: {allowed}"):
        STRATEGIES.parse({"name": "star"}, "strategy")
    with pytest.raises(ConfigError, match=r"^strategy.rounds=0 must be >= 1"):
        STRATEGIES.parse({"name": "merge_many", "rounds": 0}, "strategy")


def test_transform_identity_detection_ignores_dense_maps() -> None:
    from mergebench.merging.strategies import is_identity

    assert is_identity({"h0": Transform.permutation(torch.arange(4))})
    assert not is_identity({"h0": Transform.permutation(torch.tensor([1, 0, 2, 3]))})
    assert not is_identity({"h0": Transform.dense(torch.eye(4))})


@pytest.mark.parametrize(("arch", "params"), [("resnet20", {"width": 0.25}), ("vgg11", {"width": 0.125, "norm": "bn"})])
def test_np_pairwise_merges_convolutional_nets(arch: str, params: dict) -> None:
    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return MODELS.get(arch).factory(MODELS.get(arch).params(**params), ModelInput(1, 8, 10)).eval()

    small = digits_context(build, batch_size=100)
    small.merge = MergeData(fit=small.merge.fit[:200], val=small.merge.val[:60])
    methods = Methods(
        component(ALIGNERS, "weight_matching"), component(AGGREGATORS, "np", epochs=1), component(REPAIRS, "reset_bn")
    )
    merged = pairwise(StrategyParams(), [build(s) for s in range(3)], methods, small)
    assert merged.diagnostics["merges"] == 2 and set(merged.artifacts) == {"merge1_np_alpha", "merge2_np_alpha"}
    assert torch.isfinite(merged.model(next(iter(small.fit_batches()))[0])).all()
