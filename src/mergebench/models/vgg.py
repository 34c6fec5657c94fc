"""VGG11×k as in the CCA Merge code: 3×3 convs with bias, ReLU, no BatchNorm by default, one linear head."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from mergebench.models.layers import SpecBuilder, WidthNormParams, make_norm
from mergebench.models.registry import MODELS, ModelInput
from mergebench.spec import PermutationSpec

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@dataclasses.dataclass
class VGGParams(WidthNormParams):
    pass


class VGG(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: float, norm: str) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.acts = nn.ModuleList()
        self.pool_after: list[bool] = []
        channels = in_channels
        for item in VGG11:
            if item == "M":
                self.pool_after[-1] = True
                continue
            out = max(1, round(int(item) * width))
            self.convs.append(nn.Conv2d(channels, out, 3, padding=1))
            self.norms.append(make_norm(norm, out, spatial=True))
            self.acts.append(nn.ReLU())
            self.pool_after.append(False)
            channels = out
        # ceil_mode keeps 28×28 and 8×8 inputs valid; the global pool makes 64×64 inputs fit the 512k head
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)
        self._init()

    def _init(self) -> None:
        gain = nn.init.calculate_gain("relu")
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=gain)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm, act, pool in zip(self.convs, self.norms, self.acts, self.pool_after):
            x = act(norm(conv(x)))
            if pool:
                x = self.pool(x)
        return self.head(self.global_pool(x).flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        b = SpecBuilder()
        previous = None
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            group = f"conv{i}"
            b.layer(f"convs.{i}", conv, group, previous)
            b.norm(f"norms.{i}", norm, group)
            b.probe(group, f"acts.{i}")
            previous = group
        b.layer("head", self.head, None, previous)
        return b.build()


@MODELS.register("vgg11", VGGParams)
def build_vgg11(params: VGGParams, data: ModelInput) -> VGG:
    return VGG(data.channels, data.num_classes, params.width, params.norm)
