"""The per-merge spec check never refuses a correct spec for reasons outside it (float32 rounding, train-time
randomness, buffers a state dict omits), still refuses a wrong one, and says which it is."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mergebench.spec import PermutationSpec
from mergebench.spec.trace import trace_spec
from mergebench.spec.verify import SpecMismatchError, verify_spec


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ImageNetTail(nn.Module):
    """An ImageNet-style net at the check's 8×8 crop: three stride-2 stages leave 1×1, where each BatchNorm's
    batch statistics come from 4 values, then a residual tail of 1×1 conv + BN (ResNet-50's last stage)."""

    def __init__(self, width: int = 64, depth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 2), conv_bn(width, width, 2), conv_bn(width, width, 2))
        self.tail = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width)) for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.tail:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def similar_images(n: int = 4) -> Tensor:
    """Four crops that differ little: batch statistics of nearly equal values magnify rounding."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 8, 8, generator=gen) + 1e-3 * torch.randn(n, 3, 8, 8, generator=gen)


def test_float32_rounding_in_batch_statistics_is_not_a_spec_error() -> None:
    """In float32 this model's own permuted copy differs by ~5e-3 in train mode (allowed 3e-4): the old check
    refused the correct spec and blamed it. The float64 copy, which decides such cases now, leaves ~1e-11."""
    torch.manual_seed(0)
    model, x = ImageNetTail(), similar_images()
    spec = trace_spec(model, x).spec
    with torch.no_grad():
        reference = model.train()(x)
        rounding = (model(x) - model.to(torch.float64)(x.double()).float()).abs().max().item()
    model.float().eval()
    assert rounding > 1e-5, "the model must show float32 rounding for this test to mean anything"
    for seed in range(3):
        check = verify_spec(model, spec, x, seed=seed)
        assert check.dtype == "float64" and check.max_diff["train"] < 1e-9 * check.scale
        assert check.diagnostics()["verify_float32_diff_train"] > 1e-4 * check.scale  # float32 alone refused
    assert not model.training and model.head.weight.dtype == torch.float32  # the user's model is untouched
    assert torch.equal(model.train()(x), reference)


def test_a_wrong_spec_is_refused_above_rounding() -> None:
    torch.manual_seed(0)
    model, x = ImageNetTail(), similar_images()
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 8, 8))  # running statistics that are not all 0 and 1
    spec = trace_spec(model, x).spec
    broken = dict(spec.axes)
    broken["tail.3.1.running_var"] = (None,)
    with pytest.raises(SpecMismatchError, match=r"in eval mode, above rounding \(a float64 copy") as err:
        verify_spec(model.eval(), PermutationSpec(broken, spec.probes), x)
    assert "\n" not in str(err.value)


class DeepBatchNorm(nn.Module):
    """60 Linear + BatchNorm1d layers on batches of 4: train mode is so ill-conditioned that float32 is all rounding
    (its own permuted copy differs by ~1.0) and float64 rounding reaches ~1e-5, far above what float32's difference
    scaled to float64 predicts (~2e-7): regnet_x_400mf at 32×32 behaves like this."""

    def __init__(self, depth: int = 60, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()) for _ in range(depth)
        )
        self.out = nn.Linear(width, 3)
        with torch.no_grad():  # scales and shifts that are not all 1 and 0, so a wrong axis shows
            for block in self.blocks:
                block[1].weight.uniform_(0.5, 1.5)
                block[1].bias.normal_(0.0, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_float64_rounding_is_measured_where_float32_is_saturated() -> None:
    """The float64 copy's own sensitivity to rounding-sized input changes sets its floor, per mode: the correct spec
    passes (the float32-scaled floor alone refused it), and a dropped BatchNorm scale axis is still refused."""
    torch.manual_seed(0)
    model, x = DeepBatchNorm().eval(), torch.randn(4, 8)
    spec = trace_spec(model, x).spec
    diagnostics = verify_spec(model, spec, x).diagnostics()
    assert diagnostics["verify_dtype"] == "float64" and diagnostics["verify_float32_diff_train"] > 0.1
    scaled = 100 * diagnostics["verify_float32_diff_train"] * 2.0**-29
    assert diagnostics["verify_max_diff_train"] > scaled  # the old floor would have refused it
    # eval mode passed in float32 and stands; only train mode is decided on the float64 copy, with its own floor
    assert "verify_float64_floor_eval" not in diagnostics and diagnostics["verify_float64_floor_train"] > 1e-12
    broken = dict(spec.axes)
    broken["blocks.30.1.weight"] = (None,)
    with pytest.raises(SpecMismatchError, match=r"permuting group 'blocks.30.0' .* above rounding"):
        verify_spec(model, PermutationSpec(broken, spec.probes), x)


class DropPath(nn.Module):
    """timm's DropPath / torchvision's StochasticDepth as a user writes them: no `nn.Dropout` anywhere."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = (torch.rand_like(x[:, :1, :1, :1]) > self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, width: int, functional: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.functional = functional
        self.drop = DropPath()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if self.functional:  # torchvision.ops.stochastic_depth called in the block's own forward
            y = y * (torch.rand_like(y[:, :1, :1, :1]) > 0.5).to(y.dtype) if self.training else y
        else:
            y = self.drop(y)
        return torch.relu(x + y)


class StochasticDepthNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = conv_bn(3, width)
        self.blocks = nn.Sequential(Block(width, functional=False), Block(width, functional=True))
        self.head = nn.Linear(width, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_train_time_randomness_is_found_and_switched_off() -> None:
    """The old check switched off nn.Dropout only: drop path modules and a functional stochastic depth made the
    two forwards differ by the dropped residual branches."""
    torch.manual_seed(0)
    model, x = StochasticDepthNet(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model.blocks[1].bn.bias.normal_()  # a shift a wrong spec would move
    spec = trace_spec(model, x).spec
    check = verify_spec(model, spec, x)
    assert check.random_off == ("blocks.0.drop", "blocks.1")
    assert check.max_diff["train"] < 1e-6 * check.scale and check.dtype == "float32"
    broken = dict(spec.axes)
    broken["blocks.1.bn.bias"] = (None,)
    with pytest.raises(SpecMismatchError, match=r"group 'stem.0' .* in eval mode, above rounding"):
        verify_spec(model, PermutationSpec(broken, spec.probes), x)


class IndexedBias(nn.Module):
    """LeViT's attention biases: a table read through a non-persistent index buffer, which no state dict holds."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, width), nn.Linear(width, 3)
        self.table = nn.Parameter(torch.randn(5))
        self.register_buffer("index", torch.tensor([4, 0, 2]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + self.table[self.index]


def test_non_persistent_buffers_are_kept() -> None:
    """The old check swapped every buffer for the state dict's and ended in a raw KeyError: 'index'."""
    model, x = IndexedBias(), torch.randn(4, 4)
    spec = trace_spec(model, x).spec
    assert spec.groups == ["fc1"] and "index" not in model.state_dict()
    check = verify_spec(model, spec, x)
    assert check.max_diff["eval"] < 1e-6 * check.scale
