"""The MNIST MLP of Git Re-Basin and Yamada et al.: input -> 512 -> 512 -> 512 -> classes, ReLU."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from torch import Tensor, nn

from mergebench.errors import ConfigError
from mergebench.models.layers import SpecBuilder, WidthNormParams, make_norm
from mergebench.models.registry import MODELS, ModelInput
from mergebench.spec import PermutationSpec

SMOKE_HIDDEN = 64  # smoke=true: hidden layers shrink to at most this many units


@dataclasses.dataclass
class MLPParams(WidthNormParams):
    hidden: list[int] = dataclasses.field(default_factory=lambda: [512, 512, 512])

    def check(self) -> None:
        super().check()
        if not self.hidden or min(self.hidden) <= 0:
            raise ConfigError(f"hidden={self.hidden} must be a non-empty list of positive widths")

    @staticmethod
    def smoke(values: dict[str, Any]) -> dict[str, Any]:
        """smoke=true: the width shrinks, and every hidden layer to at most SMOKE_HIDDEN units."""
        values = WidthNormParams.smoke(values)
        return {**values, "hidden": [min(h, SMOKE_HIDDEN) for h in values["hidden"]]} if "hidden" in values else values


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: list[int], norm: str) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.norms = nn.ModuleList(make_norm(norm, b, spatial=False) for b in hidden)
        self.acts = nn.ModuleList(nn.ReLU() for _ in hidden)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        for layer, norm, act in zip(self.layers, self.norms, self.acts):
            x = act(norm(layer(x)))
        return self.head(x)

    def permutation_spec(self) -> PermutationSpec:
        b = SpecBuilder()
        previous = None
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            group = f"h{i}"
            b.layer(f"layers.{i}", layer, group, previous)
            b.norm(f"norms.{i}", norm, group)
            b.probe(group, f"acts.{i}")
            previous = group
        b.layer("head", self.head, None, previous)
        return b.build()


@MODELS.register("mlp", MLPParams)
def build_mlp(params: MLPParams, data: ModelInput) -> MLP:
    hidden = [max(1, round(h * params.width)) for h in params.hidden]
    return MLP(data.channels * data.size * data.size, data.num_classes, hidden, params.norm)
