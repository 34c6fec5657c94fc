"""C2M3: the pairwise maps through the universe compose exactly around every cycle, planted permutations are
recovered, Frank–Wolfe never lowers its objective, and the strategy merges K models end to end."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from mergebench.align import ALIGNERS
from mergebench.align.c2m3 import between, universe_matching
from mergebench.align.weight_matching import parameters
from mergebench.merging import AGGREGATORS, REPAIRS, STRATEGIES
from mergebench.merging.registry import Methods
from mergebench.merging.strategies import StrategyParams
from mergebench.models import MODELS, ModelInput
from mergebench.registry import Component
from mergebench.spec import PermutationSpec, Transform, apply_transforms, random_permutations
from tests.digits_pair import digits_context
from tests.test_cli import cli


def mlp(seed: int, hidden: tuple[int, ...] = (24, 16)) -> nn.Module:
    torch.manual_seed(seed)
    entry = MODELS.get("mlp")
    return entry.factory(entry.params(hidden=list(hidden), norm="none"), ModelInput(1, 8, 10)).eval()


def matrix(perm: Tensor) -> Tensor:
    """P with P[i, perm[i]] = 1: P·W takes row perm[i] of W as row i."""
    return torch.eye(len(perm), dtype=torch.float64)[perm]


def carried(
    state: dict[str, Tensor], spec: PermutationSpec, universe_to: dict[str, Tensor], universe_from: dict[str, Tensor]
) -> dict[str, Tensor]:
    """`state` (of the model whose universe map is `universe_from`) carried into the other model's basis."""
    return apply_transforms(
        state, spec, {g: Transform.permutation(between(universe_to[g], universe_from[g])) for g in universe_to}
    )


def test_pairwise_maps_are_cycle_consistent_exactly() -> None:
    models = [mlp(s) for s in range(4)]
    spec = models[0].permutation_spec()
    universe, _ = universe_matching(spec, [parameters(m) for m in models], max_iter=20)
    for i, j in itertools.product(range(4), repeat=2):
        for g in spec.groups:  # P_ij = P_iᵀ P_j with P_k carrying model k into the universe
            expected = matrix(universe[i][g]).T @ matrix(universe[j][g])
            assert torch.equal(matrix(between(universe[i][g], universe[j][g])), expected)
    states = [m.state_dict() for m in models]
    for i, j, k in itertools.permutations(range(4), 3):  # k → j → i is k → i, weight for weight
        via = carried(carried(states[k], spec, universe[j], universe[k]), spec, universe[i], universe[j])
        direct = carried(states[k], spec, universe[i], universe[k])
        assert all(torch.equal(via[name], direct[name]) for name in direct)
    assert any(not torch.equal(universe[1][g], torch.arange(len(universe[1][g]))) for g in spec.groups)


def test_planted_permutations_are_recovered() -> None:
    model_0 = mlp(0, (32, 24))
    spec = model_0.permutation_spec()
    state = model_0.state_dict()
    planted = [random_permutations(spec, state, seed=s) for s in (1, 2)]
    others = [apply_transforms(state, spec, p) for p in planted]
    for count in (2, 3):  # K = 2, and K = 3 with a second planted copy
        states = [parameters(model_0), *others[: count - 1]]
        universe, info = universe_matching(spec, states)
        for k in range(1, count):
            for g, tf in planted[k - 1].items():
                assert between(universe[0][g], universe[k][g]).equal(torch.argsort(tf.perm)), (count, k, g)
        total = sum(float(v.double().pow(2).sum()) for n, v in parameters(model_0).items() if any(spec.axes[n]))
        assert abs(info["objective"] - total * count * (count - 1) / 2) < 1e-9 * total


def test_frank_wolfe_never_lowers_the_objective_and_reports_it_truthfully() -> None:
    models = [mlp(s) for s in range(3)]
    spec = models[0].permutation_spec()
    states = [parameters(m) for m in models]
    universe, info = universe_matching(spec, states, max_iter=200)
    history = info["history"]
    assert len(history) >= 4 and info["iterations"] == len(history) - 1 <= 200
    assert all(b >= a for a, b in itertools.pairwise(history)) and history[-1] > history[0]
    # the projected permutations' objective is Σ_{i<j} ⟨W_i, P_ij(W_j)⟩ over the parameters a group acts on
    grouped = [n for n in states[0] if any(spec.axes[n])]
    mapped = [carried(s, spec, universe[0], universe[k]) for k, s in enumerate(states)]
    direct = sum(
        float((mapped[i][n].double() * mapped[j][n].double()).sum())
        for i, j in itertools.combinations(range(3), 2)
        for n in grouped
    )
    assert abs(direct - info["objective"]) < 1e-9 * abs(direct)
    assert info["seconds"] > 0
    assert universe_matching(spec, states, max_iter=1)[1]["iterations"] == 1


def component(registry, name: str, **params) -> Component:
    entry, parsed = registry.parse({"name": name, **params})
    return Component(name, entry.factory, parsed)


def test_the_aligner_carries_every_model_to_model_0_through_the_universe() -> None:
    """Registered as a joint aligner: all_to_one runs it on the K models at once, model 0 stays as it is."""
    ctx = digits_context(lambda: mlp(0))
    models = [mlp(s) for s in range(3)]
    methods = Methods(
        component(ALIGNERS, "c2m3", max_iter=50), component(AGGREGATORS, "avg"), component(REPAIRS, "none")
    )
    merged = STRATEGIES.get("all_to_one").factory(StrategyParams(), models, methods, ctx)
    aligned = merged.aligned_to_first
    assert len(aligned) == 3 and aligned[0] is models[0]
    universe, _ = universe_matching(ctx.spec, [parameters(m) for m in models], max_iter=50)
    for k in (1, 2):
        expected = carried(models[k].state_dict(), ctx.spec, universe[0], universe[k])
        assert all(torch.equal(aligned[k].state_dict()[n], v) for n, v in expected.items())
    mean = {n: sum(m.state_dict()[n] for m in aligned) / 3 for n in expected}
    assert all(torch.allclose(merged.model.state_dict()[n], v) for n, v in mean.items())
    d = merged.diagnostics
    assert d["align_iterations"] == len(d["align_history"]) - 1 and d["align_s"] > 0 and "agg_s" in d


def test_c2m3_with_four_models_runs_end_to_end(tmp_path: Path) -> None:
    args = [
        "align=c2m3",
        "data.num_models=4",
        "dataset=digits",
        "model=mlp",
        "model.hidden=[64,64]",
        "train.epochs=5",
    ]
    proc = cli([*args, "hydra.run.dir=outputs/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(tmp_path / "outputs/run/results.csv")
    merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    assert len(merged) == 1 and 0 <= merged.value.iloc[0] <= 100
    assert {"base_0", "base_3"} <= set(df.model_role)
