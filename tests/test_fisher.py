"""Fisher merging: the per-entry combination, the sampled-label Fisher against its closed form, and the merge."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mergebench.merging.fisher import FisherParams, aggregate_fisher, diagonal_fisher, fisher_combine


def random_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 4, generator=gen), "b": torch.randn(5, generator=gen)}


def test_equal_fishers_give_the_weighted_average() -> None:
    a, b = random_state(0), random_state(1)
    fisher = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(2)) for n, t in a.items()}
    merged = fisher_combine([a, b], [fisher, fisher], [0.5, 0.5], eps=1e-8)
    for name in a:
        torch.testing.assert_close(merged[name], 0.5 * a[name] + 0.5 * b[name])
    skewed = fisher_combine([a, b], [fisher, fisher], [0.3, 0.7], eps=0.0)
    torch.testing.assert_close(skewed["w"], 0.3 * a["w"] + 0.7 * b["w"])


def test_an_entry_with_zero_fisher_in_one_model_takes_the_other_models_value() -> None:
    a, b = random_state(0), random_state(1)
    fa = {n: torch.rand_like(t) + 0.1 for n, t in a.items()}
    fb = {n: torch.rand_like(t) + 0.1 for n, t in a.items()}
    fa["w"][2, 3] = 0.0  # A's likelihood does not depend on this entry: B's value wins
    fb["b"][1] = 0.0
    merged = fisher_combine([a, b], [fa, fb], [0.5, 0.5], eps=0.0)
    assert merged["w"][2, 3] == pytest.approx(b["w"][2, 3].item(), abs=1e-6)
    assert merged["b"][1] == pytest.approx(a["b"][1].item(), abs=1e-6)
    three_to_one = fisher_combine([a, b], [{"w": torch.full((5, 4), 3.0)}, {"w": torch.ones(5, 4)}], [0.5, 0.5], 0.0)
    torch.testing.assert_close(three_to_one["w"], 0.75 * a["w"] + 0.25 * b["w"])  # weighted by F, not √F
    both_zero = fisher_combine([a, b], [{"w": torch.zeros(5, 4)}] * 2, [0.5, 0.5], eps=1e-8)
    torch.testing.assert_close(both_zero["w"], 0.5 * a["w"] + 0.5 * b["w"])  # ε: the average, not 0/0


def test_sampled_fisher_of_softmax_regression_matches_its_closed_form() -> None:
    """For logits = W x, E_{y~p}[(∂ log p_y / ∂W_ij)²] = p_i (1 − p_i) x_j²; the data's labels (all 0 here) play
    no part, which the empirical Fisher would get wrong."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    x = torch.randn(4000, 4)
    batches = [(x[i : i + 500], torch.zeros(500, dtype=torch.long)) for i in range(0, 4000, 500)]
    fisher, used = diagonal_fisher(model, batches, 3000, torch.Generator().manual_seed(0))
    assert used == 3000
    with torch.no_grad():
        p = torch.softmax(model(x[:3000]), dim=1)
        expected = (p * (1 - p)).T @ x[:3000].square() / 3000
    torch.testing.assert_close(fisher["weight"], expected, rtol=0.1, atol=0.0)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def test_a_dead_unit_takes_the_other_models_outgoing_weights() -> None:
    torch.manual_seed(0)
    a, b = TwoLayer(), TwoLayer()
    with torch.no_grad():
        a.hidden.bias[1] = -1e3  # unit 1 of A never fires: its outgoing weights have zero Fisher in A
        b.hidden.bias[1] = 2.0  # and fires on most inputs in B
    x = torch.randn(256, 3)
    ctx = SimpleNamespace(build_model=TwoLayer, seeded_fit_batches=lambda: [(x[:128], None), (x[128:], None)], seed=0)
    merged = aggregate_fisher(FisherParams(samples=200, eps=1e-12), [a, b], ctx)
    torch.testing.assert_close(merged.model.out.weight[:, 1], b.out.weight[:, 1].detach())
    mean = 0.5 * (a.out.weight + b.out.weight)
    assert not torch.allclose(merged.model.out.weight[:, 0], mean[:, 0].detach(), atol=1e-3)
    assert merged.diagnostics["fisher_samples"] == 200
    assert len(merged.diagnostics["fisher_mass"]) == 2 and min(merged.diagnostics["fisher_mass"]) > 0
    assert merged.weights == [0.5, 0.5]
