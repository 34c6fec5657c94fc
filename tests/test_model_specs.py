"""Every architecture's permutation spec is tested, not trusted: permuting leaves the function unchanged."""

from __future__ import annotations

import pytest
import torch

from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.spec import Transform, apply_transforms, random_permutations

CASES = [
    ("mlp", {"hidden": [32, 24, 16]}, 1, 8),
    ("vgg11", {"width": 0.125}, 3, 32),
    ("resnet20", {"width": 1.0}, 3, 16),
    ("resnet18", {"width": 0.125, "stem": "cifar"}, 3, 16),
    ("resnet18", {"width": 0.125, "stem": "imagenet"}, 3, 64),
]


def build(name: str, params: dict, channels: int, size: int, norm: str) -> torch.nn.Module:
    entry = MODELS.get(name)
    return entry.factory(to_dataclass(entry.params, {**params, "norm": norm}, "model"), ModelInput(channels, size, 10))


@pytest.mark.parametrize("norm", ["bn", "layernorm", "none"])
@pytest.mark.parametrize(("name", "params", "channels", "size"), CASES)
def test_random_permutation_keeps_logits(name: str, params: dict, channels: int, size: int, norm: str) -> None:
    torch.manual_seed(0)
    model = build(name, params, channels, size, norm)
    x = torch.randn(32, channels, size, size)
    model.train()
    with torch.no_grad():  # non-trivial BN running statistics, so a forgotten buffer shows
        for _ in range(3):
            model(x * 2 + 1)
    spec = model.permutation_spec()
    state = model.state_dict()
    assert set(spec.axes) == set(state), "the spec must name every parameter and buffer"
    for key, groups in spec.axes.items():
        assert len(groups) in (0, state[key].dim()), key
    transforms = random_permutations(spec, state, seed=1)
    permuted = build(name, params, channels, size, norm)
    permuted.load_state_dict(apply_transforms(state, spec, transforms))
    changed = [k for k in state if not torch.equal(state[k], permuted.state_dict()[k])]
    assert changed, "the permutation must actually move weights"
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(permuted, mode)()
        with torch.no_grad():
            a, b = model(x[:8]), permuted(x[:8])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize(("name", "params", "channels", "size"), CASES)
def test_every_group_has_a_probe_module(name: str, params: dict, channels: int, size: int) -> None:
    model = build(name, params, channels, size, "bn")
    spec = model.permutation_spec()
    modules = dict(model.named_modules())
    assert set(spec.probes) == set(spec.groups)
    state = model.state_dict()
    for group, probes in spec.probes.items():
        for probe in probes:
            assert probe in modules, probe
        # the probe's output carries exactly the group's units
        seen: dict[str, torch.Tensor] = {}

        def keep(module: torch.nn.Module, inputs: tuple, output: torch.Tensor, seen: dict = seen) -> None:
            seen["out"] = output

        handle = modules[probes[0]].register_forward_hook(keep)
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, channels, size, size))
        handle.remove()
        assert seen["out"].shape[1] == spec.group_size(group, state)


def test_residual_stream_is_one_group_per_stage() -> None:
    spec = build("resnet20", {}, 3, 16, "bn").permutation_spec()
    assert spec.axes["stages.0.0.conv2.weight"][0] == spec.axes["stem.conv.weight"][0] == "s0"
    assert spec.axes["stages.1.0.shortcut.0.weight"][:2] == ("s1", "s0")
    assert spec.axes["stages.1.0.shortcut.0.weight"][2:] == (None, None)
    assert build("resnet20", {}, 3, 16, "bn").stages[1][0].shortcut[0].kernel_size == (3, 3)
    assert spec.axes["head.weight"] == (None, "s2")
    assert len(spec.groups) == 3 + 9


def test_dense_transform_on_linear_net_keeps_function() -> None:
    torch.manual_seed(0)
    model = build("mlp", {"hidden": [6, 5, 4]}, 1, 2, "none")
    spec = model.permutation_spec()
    state = model.state_dict()
    # a dense map is exact where the net is linear in the group: remove the ReLU after layer 0
    model.acts[0] = torch.nn.Identity()
    other = build("mlp", {"hidden": [6, 5, 4]}, 1, 2, "none")
    other.acts[0] = torch.nn.Identity()
    mix = torch.randn(6, 6) + 3 * torch.eye(6)
    other.load_state_dict(apply_transforms(state, spec, {"h0": Transform.dense(mix)}))
    x = torch.randn(5, 1, 2, 2)
    torch.testing.assert_close(other(x), model(x), rtol=1e-4, atol=1e-5)


def test_bad_width_and_norm_are_one_line_errors() -> None:
    from mergebench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.width=0 must be > 0"):
        to_dataclass(MODELS.get("mlp").params, {"width": 0}, "model")
    with pytest.raises(ConfigError, match=r"model\.norm='gn' is not known; allowed: bn, layernorm, none"):
        to_dataclass(MODELS.get("resnet20").params, {"norm": "gn"}, "model")
