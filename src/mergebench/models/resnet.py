"""CIFAR ResNet-20×k and ResNet-18×k, with one permutation group per stage's residual stream."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from mergebench.errors import ConfigError
from mergebench.models.layers import SpecBuilder, WidthNormParams, make_norm
from mergebench.models.registry import MODELS, ModelInput
from mergebench.spec import PermutationSpec

STEMS = ("cifar", "imagenet")


@dataclasses.dataclass
class ResNet20Params(WidthNormParams):
    norm: str = "bn"


@dataclasses.dataclass
class ResNet18Params(WidthNormParams):
    norm: str = "bn"
    stem: str = "cifar"

    def check(self) -> None:
        super().check()
        if self.stem not in STEMS:
            raise ConfigError(f"stem={self.stem!r} is not known; allowed: {', '.join(STEMS)}")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, shortcut_kernel: int) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.norm1 = make_norm(norm, cout, spatial=True)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.norm2 = make_norm(norm, cout, spatial=True)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            pad = shortcut_kernel // 2
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, shortcut_kernel, stride, pad, bias=bias), make_norm(norm, cout, spatial=True)
            )
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(
        self,
        data: ModelInput,
        widths: list[int],
        blocks: int,
        norm: str,
        stem: str,
        shortcut_kernel: int,
    ) -> None:
        super().__init__()
        bias = norm == "none"
        stem_layers: dict[str, nn.Module] = {}
        if stem == "imagenet":
            stem_layers["conv"] = nn.Conv2d(data.channels, widths[0], 7, 2, 3, bias=bias)
        else:
            stem_layers["conv"] = nn.Conv2d(data.channels, widths[0], 3, 1, 1, bias=bias)
        stem_layers["norm"] = make_norm(norm, widths[0], spatial=True)
        stem_layers["act"] = nn.ReLU()
        if stem == "imagenet":
            stem_layers["pool"] = nn.MaxPool2d(3, 2, 1)
        self.stem = nn.Sequential()
        for name, module in stem_layers.items():
            self.stem.add_module(name, module)
        self.stages = nn.ModuleList()
        cin = widths[0]
        for j, cout in enumerate(widths):
            stage = nn.Sequential(
                *(
                    BasicBlock(cin if i == 0 else cout, cout, 2 if (i == 0 and j > 0) else 1, norm, shortcut_kernel)
                    for i in range(blocks)
                )
            )
            self.stages.append(stage)
            cin = cout
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], data.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.pool(x).flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        b = SpecBuilder()
        b.layer("stem.conv", self.stem.conv, "s0", None)
        b.norm("stem.norm", self.stem.norm, "s0")
        b.probe("s0", "stem.act")
        stream = "s0"
        for j, stage in enumerate(self.stages):
            out_stream = f"s{j}"
            for i, block in enumerate(stage):
                p = f"stages.{j}.{i}"
                inner = f"s{j}.b{i}"
                in_stream = stream if i == 0 else out_stream
                b.layer(f"{p}.conv1", block.conv1, inner, in_stream)
                b.norm(f"{p}.norm1", block.norm1, inner)
                b.probe(inner, f"{p}.act1")
                b.layer(f"{p}.conv2", block.conv2, out_stream, inner)
                b.norm(f"{p}.norm2", block.norm2, out_stream)
                if block.shortcut is not None:
                    b.layer(f"{p}.shortcut.0", block.shortcut[0], out_stream, in_stream)
                    b.norm(f"{p}.shortcut.1", block.shortcut[1], out_stream)
                b.probe(out_stream, f"{p}.act2")
            stream = out_stream
        b.layer("head", self.head, None, stream)
        return b.build()


def _scaled(widths: tuple[int, ...], k: float) -> list[int]:
    return [max(1, round(w * k)) for w in widths]


@MODELS.register("resnet20", ResNet20Params)
def build_resnet20(params: ResNet20Params, data: ModelInput) -> ResNet:
    # a shape-changing shortcut is a 3×3 stride-2 conv + norm, as in the CCA Merge and Git Re-Basin code
    return ResNet(data, _scaled((16, 32, 64), params.width), 3, params.norm, "cifar", shortcut_kernel=3)


@MODELS.register("resnet18", ResNet18Params)
def build_resnet18(params: ResNet18Params, data: ModelInput) -> ResNet:
    return ResNet(data, _scaled((64, 128, 256, 512), params.width), 2, params.norm, params.stem, shortcut_kernel=1)
