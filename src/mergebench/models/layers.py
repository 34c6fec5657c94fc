"""Normalisation layers and the spec builder the architectures share."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench.errors import ConfigError
from mergebench.spec import PermutationSpec

NORMS = ("bn", "layernorm", "none")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels at every position (Git Re-Basin's ResNet norm); permutation-equivariant."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


def check_width_norm(width: float, norm: str) -> None:
    if width <= 0:
        raise ConfigError(f"width={width:g} must be > 0")
    if norm not in NORMS:
        raise ConfigError(f"norm={norm!r} is not known; allowed: {', '.join(NORMS)}")


SMOKE_WIDTH = 0.25  # smoke=true: width multipliers shrink to at most this


@dataclasses.dataclass
class WidthNormParams:
    """The width multiplier and norm of the built-in architectures. They are also the settings the results' `width`
    and `norm` columns report (`result_columns`), and what `smoke=true` shrinks (`smoke`)."""

    width: float = 1.0
    norm: str = "none"

    def check(self) -> None:
        check_width_norm(self.width, self.norm)

    def result_columns(self) -> dict[str, Any]:
        return {"width": self.width, "norm": self.norm}

    @staticmethod
    def smoke(values: dict[str, Any]) -> dict[str, Any]:
        return {**values, "width": min(float(values["width"]), SMOKE_WIDTH)} if "width" in values else values


def make_norm(kind: str, channels: int, spatial: bool) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
    if kind == "layernorm":
        return ChannelLayerNorm(channels) if spatial else nn.LayerNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm={kind!r} is not known; allowed: {', '.join(NORMS)}")


class SpecBuilder:
    """Collects (tensor -> groups per axis) and (group -> probe modules) while a model lays out its layers."""

    def __init__(self) -> None:
        self.axes: dict[str, tuple[str | None, ...]] = {}
        self.probes: dict[str, list[str]] = {}

    def layer(self, name: str, module: nn.Module, out_group: str | None, in_group: str | None) -> None:
        """A conv or linear layer: weight [out, in, ...], optional bias [out]."""
        weight = module.weight
        self.axes[f"{name}.weight"] = (out_group, in_group) + (None,) * (weight.dim() - 2)
        if getattr(module, "bias", None) is not None:
            self.axes[f"{name}.bias"] = (out_group,)

    def norm(self, name: str, module: nn.Module, group: str) -> None:
        for key, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            self.axes[f"{name}.{key}"] = (group,) if key != "num_batches_tracked" else ()

    def probe(self, group: str, module_name: str) -> None:
        self.probes.setdefault(group, []).append(module_name)

    def build(self) -> PermutationSpec:
        return PermutationSpec(axes=dict(self.axes), probes={g: tuple(m) for g, m in self.probes.items()})
