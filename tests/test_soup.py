"""Learned soup: it starts at the uniform soup, learns to drop a useless model, and records its weights."""

from __future__ import annotations

import pytest
import torch

from mergebench.merging.soup import SoupParams, aggregate_soup
from tests.digits_pair import DigitsPair, digits_models


@pytest.fixture(scope="module")
def trained_and_random() -> DigitsPair:
    """A model trained on all digits and a random initialisation of the same architecture (seed 7)."""
    pair = digits_models(num_models=1, epochs=20)
    torch.manual_seed(7)
    pair.models.append(pair.build().eval())
    return pair


def test_zero_epochs_is_the_uniform_soup(trained_and_random: DigitsPair) -> None:
    models = trained_and_random.models
    merged = aggregate_soup(SoupParams(epochs=0), models, trained_and_random.ctx)
    mean = 0.5 * (models[0].layers[0].weight + models[1].layers[0].weight)
    torch.testing.assert_close(merged.model.layers[0].weight, mean.detach())
    assert merged.weights == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_a_useless_model_gets_a_weight_below_one_tenth(trained_and_random: DigitsPair, granularity: str) -> None:
    merged = aggregate_soup(SoupParams(granularity=granularity), trained_and_random.models, trained_and_random.ctx)
    weights = merged.artifacts["soup_weights"]
    names = {n for n, _ in trained_and_random.models[0].named_parameters()}
    assert set(weights) == ({"model"} if granularity == "model" else names)
    for w in weights.values():
        assert w.shape == (2,) and w.sum().item() == pytest.approx(1.0)
    assert merged.weights[1] < 0.1, merged.diagnostics["soup_weights"]
    assert merged.diagnostics["soup_weights"]["model" if granularity == "model" else "head.weight"][1] < 0.1
    losses = merged.diagnostics["soup_epoch_loss"]
    assert len(losses) == 10 and losses[-1] < losses[0]
