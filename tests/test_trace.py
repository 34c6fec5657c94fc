"""Traced permutation specs: equal to the hand-written ones, function-preserving on user architectures, planted
permutations recovered, and a broken spec caught by the per-merge verification."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mergebench
from mergebench.align.activations import activation_stats
from mergebench.align.permute import correlation_matching
from mergebench.align.weight_matching import weight_matching
from mergebench.models import MODELS, ModelInput
from mergebench.registry import to_dataclass
from mergebench.spec import Part, PermutationSpec, ProbeView, Transform, apply_transforms, random_permutations
from mergebench.spec.trace import TraceError, model_spec, trace_spec
from mergebench.spec.verify import (
    SpecMismatchError,
    checked_spec,
    moving_permutations,
    verification_input,
    verify_spec,
)
from tests import user_models

BUILT_IN = [
    ("mlp", {"hidden": [32, 24, 16]}, 1, 8),
    ("vgg11", {"width": 0.125}, 3, 32),
    ("resnet20", {"width": 1.0}, 3, 16),
    ("resnet18", {"width": 0.125, "stem": "cifar"}, 3, 16),
    ("resnet18", {"width": 0.125, "stem": "imagenet"}, 3, 64),
]
USER = {
    "resnet18_style": (user_models.ResNet18Style, {"width": 8}),
    "mobilenetv2_style": (user_models.MobileNetV2Style, {"width": 8}),
    "convnext_style": (user_models.ConvNeXtStyle, {"width": 8, "kernel": 3}),
    "mixer_style": (user_models.MixerStyle, {"width": 8}),
    "vit_style": (user_models.ViTStyle, {"width": 8}),
    "vgg_flatten_style": (user_models.VGGFlattenStyle, {"width": 8}),
    "densenet_style": (user_models.DenseNetStyle, {"width": 8}),
    "shufflenet_style": (user_models.ShuffleNetStyle, {"width": 8}),
    "regnet_style": (user_models.RegNetStyle, {"width": 8}),
    "gated_transformer_style": (user_models.GatedTransformerStyle, {"width": 8}),
}
# every group; activation statistics reach all of them: channels-last maps and tokens through their probe views,
# groups that only appear as segments of a wider axis (the heads' shared inner permutation, a grouped conv's
# blocks, chunk's pieces, the channel shuffle's halves) through segment probes `module[start:stop]`
EXPECTED_GROUPS = {
    **{"resnet18_style": 12, "mobilenetv2_style": 9, "convnext_style": 6, "mixer_style": 5, "vit_style": 7},
    **{"vgg_flatten_style": 3, "densenet_style": 5, "shufflenet_style": 16, "regnet_style": 35},
    "gated_transformer_style": 7,
}
SEGMENT_PROBES = {
    "vit_style": 4,
    "densenet_style": 7,
    "shufflenet_style": 8,
    "regnet_style": 28,
    "gated_transformer_style": 6,
}
# no warning: views that cut an axis into heads × units of a head keep both as attention heads, and a channel
# shuffle's 2 × C/2 view is followed whole (its halves interleaved, each with its own permutation)
# groups whose probes read the units on the last axis (channels-last maps, tokens)
EXPECTED_LAST_AXIS = {"convnext_style": 6, "mixer_style": 5, "vit_style": 7, "gated_transformer_style": 7}
# groups made of attention heads (q/k and v of each of two blocks)
EXPECTED_HEADS = {"vit_style": 4, "gated_transformer_style": 4}


def build_builtin(name: str, params: dict, channels: int, size: int, norm: str) -> nn.Module:
    entry = MODELS.get(name)
    return entry.factory(to_dataclass(entry.params, {**params, "norm": norm}, "model"), ModelInput(channels, size, 10))


def partition(spec: PermutationSpec) -> set[frozenset[tuple[str, int]]]:
    """The groups as sets of (tensor, axis): equal partitions = equal specs up to the groups' names."""
    members: dict[str, set[tuple[str, int]]] = {}
    for name, groups in spec.axes.items():
        for axis, group in enumerate(groups):
            if group is not None:
                members.setdefault(group, set()).add((name, axis))
    return {frozenset(m) for m in members.values()}


def warmed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics set to those of `x * 2 + 1` (non-trivial, so a forgotten buffer shows, and units
    of unit variance on that data); eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # a cumulative average: one pass gives the exact statistics
    model.train()
    with torch.no_grad():
        model(x * 2 + 1)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize("norm", ["bn", "layernorm", "none"])
@pytest.mark.parametrize(("name", "params", "channels", "size"), BUILT_IN)
def test_traced_spec_equals_hand_written(name: str, params: dict, channels: int, size: int, norm: str) -> None:
    model = build_builtin(name, params, channels, size, norm)
    hand = model.permutation_spec()
    traced = trace_spec(model, torch.randn(2, channels, size, size))
    assert traced.warnings == []
    assert set(traced.spec.axes) == set(hand.axes)
    assert partition(traced.spec) == partition(hand)
    for key, groups in hand.axes.items():  # unpermuted axes agree too, not only the grouped ones
        assert [g is None for g in traced.spec.axes[key]] == [g is None for g in groups], key
    rename = {t: h for t, h in zip(traced.spec.groups, hand.groups)}
    assert {rename[g]: p for g, p in traced.spec.probes.items()} == hand.probes


@pytest.mark.parametrize("arch", list(USER))
def test_random_permutation_of_traced_spec_keeps_function(arch: str) -> None:
    torch.manual_seed(0)
    cls, kwargs = USER[arch]
    x = torch.randn(16, 3, 8, 8)
    model = warmed(cls(**kwargs), x)
    traced = trace_spec(model, x)
    assert traced.warnings == []
    assert len(traced.spec.groups) == EXPECTED_GROUPS[arch]
    assert len(traced.spec.heads) == EXPECTED_HEADS.get(arch, 0)
    assert set(traced.spec.probes) == set(traced.spec.groups)
    views = [traced.spec.probe_views.get(p, ProbeView()) for found in traced.spec.probes.values() for p in found]
    assert sum(view.segment is not None for view in views) == SEGMENT_PROBES.get(arch, 0)
    last = {
        g
        for g, found in traced.spec.probes.items()
        if any(traced.spec.probe_views.get(p, ProbeView()).axis != 1 for p in found)
    }
    assert len(last) == EXPECTED_LAST_AXIS.get(arch, 0)
    check = verify_spec(model, traced.spec, x, seed=3)
    assert check.groups == EXPECTED_GROUPS[arch]
    assert max(check.max_diff.values()) <= 1e-4 * check.scale
    moved = apply_transforms(model.state_dict(), traced.spec, random_permutations(traced.spec, model.state_dict(), 3))
    assert any(not torch.equal(v, moved[k]) for k, v in model.state_dict().items())


def planted(
    arch: str, heads: bool = True
) -> tuple[nn.Module, nn.Module, PermutationSpec, torch.Tensor, dict[str, Transform]]:
    """Model A, and model B = A under a random permutation of every group of its traced spec (no noise; attention
    heads left in place without `heads`)."""
    torch.manual_seed(1)
    cls, kwargs = USER[arch]
    x = torch.randn(64, 3, 8, 8)
    model_a = warmed(cls(**kwargs), x)
    spec = trace_spec(model_a, x).spec
    plant = random_permutations(spec if heads else spec.without(spec.head_groups()), model_a.state_dict(), seed=7)
    model_b = cls(**kwargs).eval()
    model_b.load_state_dict(apply_transforms(model_a.state_dict(), spec, plant))
    return model_a, model_b, spec, x, plant


def assert_recovers(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, found: dict) -> None:
    aligned = apply_transforms(model_b.state_dict(), spec, found)
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(aligned[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("arch", list(USER))
def test_weight_matching_recovers_planted_permutation(arch: str) -> None:
    model_a, model_b, spec, _, _ = planted(arch)
    perms, info = weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=0)
    assert_recovers(model_a, model_b, spec, {g: Transform.permutation(p) for g, p in perms.items()})
    assert info["passes"] >= 1


@pytest.mark.parametrize("arch", list(USER))
def test_permute_recovers_planted_permutation_of_every_group(arch: str) -> None:
    """Every group has a probe (segment probes for segments of a wider axis), so activation matching alone places
    every unit."""
    model_a, model_b, spec, x, plant = planted(arch)
    stats = activation_stats(spec, model_a, model_b, [(x * 2 + 1, None)])  # the data the BatchNorms were warmed on
    match = correlation_matching(stats)
    found, dead = match.perms, match.dead
    assert set(found) == set(spec.probes) and not dead
    for group, perm in found.items():  # plant[i] = A's unit at B's position i, so B's unit inverse[i] is A's i
        assert torch.equal(perm, torch.argsort(plant[group].perm)), group
    assert_recovers(model_a, model_b, spec, {g: Transform.permutation(p) for g, p in found.items()})


def test_a_spec_missing_one_axis_is_caught_by_the_verification() -> None:
    x = torch.randn(16, 3, 8, 8)
    model = warmed(user_models.ResNet18Style(width=8), x)
    spec = trace_spec(model, x).spec
    broken = dict(spec.axes)
    broken["layer2.0.downsample.1.running_var"] = (None,)
    with pytest.raises(SpecMismatchError, match=r"group 'layer2.0.conv2' .* in eval mode"):
        verify_spec(model, PermutationSpec(broken, spec.probes), x)


def test_a_shortcut_on_the_wrong_group_is_caught() -> None:
    """The §11 pitfall: a shape-changing shortcut whose input axis names another group of the same width."""
    x = torch.randn(16, 3, 8, 8)
    model = warmed(user_models.ResNet18Style(width=8), x)
    spec = trace_spec(model, x).spec
    assert spec.axes["layer2.0.downsample.0.weight"][1] == "conv1"
    broken = dict(spec.axes)
    broken["layer2.0.downsample.0.weight"] = ("layer2.0.conv2", "layer1.0.conv1", None, None)
    with pytest.raises(SpecMismatchError, match=r"permuting group '(conv1|layer1.0.conv1)'"):
        verify_spec(model, PermutationSpec(broken, spec.probes), x)


def test_untraceable_forward_is_one_line_naming_the_call() -> None:
    with pytest.raises(TraceError, match=r"DataDependent.forward at user_models.py:\d+ `if x.sum\(\) > 0:`") as err:
        trace_spec(user_models.DataDependent(), torch.randn(2, 4))
    assert "\n" not in str(err.value)


class WithUnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.cumsum(self.fc2(h), dim=1)  # mixes units in order: not permutation-equivariant
        return self.fc3(h)


def test_unknown_op_leaves_its_axes_unpermuted_and_is_named() -> None:
    model = WithUnknownOp()
    traced = trace_spec(model, torch.randn(4, 6))
    assert traced.spec.groups == ["fc1"]
    assert traced.spec.axes["fc2.weight"] == (None, "fc1")
    assert traced.spec.axes["fc3.weight"] == (None, None)
    assert len(traced.warnings) == 1 and "cumsum" in traced.warnings[0]
    verify_spec(model, traced.spec, torch.randn(4, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec, info = model_spec(model, torch.randn(4, 6))
    assert spec.groups == ["fc1"]
    assert info["spec"] == "traced" and any("cumsum" in str(w.message) for w in caught)


def test_flatten_of_a_spatial_map_into_linear_makes_c_blocks_of_hw() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 2)
    )
    traced = trace_spec(model, torch.randn(2, 1, 8, 8))
    assert traced.spec.groups == ["0", "3"] and traced.warnings == []
    assert traced.spec.axes["3.weight"] == ("3", None)
    assert traced.spec.parts["3.weight"] == {1: (Part("0", 0, 4, 36),)}
    verify_spec(model, traced.spec, torch.randn(2, 1, 8, 8))


def test_cat_along_channels_makes_one_part_per_input() -> None:
    """A conv over cat([a, b]) reads a's units then b's; a channel of the input image in the cat stays fixed."""

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1)
            self.norm = nn.BatchNorm2d(12)
            self.out = nn.Conv2d(12, 6, 1)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.norm(torch.cat([self.a(x), x, self.b(x)], dim=1)))
            return self.head(self.out(y).mean((2, 3)))

    model = TwoBranches()
    traced = trace_spec(model, torch.randn(2, 3, 8, 8))
    parts = (Part("a", 0, 4), Part(None, 4, 3), Part("b", 7, 5))
    assert traced.spec.parts["out.weight"] == {1: parts}
    assert traced.spec.parts["norm.running_var"] == {0: parts}
    assert traced.spec.axes["out.weight"] == ("out", None, None, None)
    verify_spec(warmed(model, torch.randn(8, 3, 8, 8)), traced.spec, torch.randn(4, 3, 8, 8))


def test_a_part_left_out_of_the_spec_is_caught_by_the_verification() -> None:
    model = warmed(user_models.DenseNetStyle(width=8), torch.randn(8, 3, 8, 8))
    spec = trace_spec(model, torch.randn(2, 3, 8, 8)).spec
    parts = dict(spec.parts)
    del parts["head.weight"]  # the flattened cat into the head forgotten
    with pytest.raises(SpecMismatchError, match=r"transition\.2|block2\.conv"):
        verify_spec(model, PermutationSpec(spec.axes, spec.probes, parts), torch.randn(4, 3, 8, 8))


def test_tied_weights_share_their_axes() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 2)
            self.c2 = self.b  # the same module under two names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.c2(torch.relu(self.b(torch.relu(self.a(x)))))))

    model = Tied()
    traced = trace_spec(model, torch.randn(3, 4))
    assert traced.spec.axes["c2.weight"] == traced.spec.axes["b.weight"] == ("a", "a")
    verify_spec(model, traced.spec, torch.randn(3, 4))


def test_verification_permutations_move_every_unit() -> None:
    spec = PermutationSpec({"w": ("g", "h"), "b": ("g",)}, {})
    state = {"w": torch.zeros(7, 2), "b": torch.zeros(7)}
    for seed in range(5):
        for group, transform in moving_permutations(spec, state, seed).items():
            n = spec.group_size(group, state)
            assert sorted(transform.perm.tolist()) == list(range(n))
            assert not (transform.perm == torch.arange(n)).any()  # even a 2-unit group is never the identity


def test_a_relu_module_called_twice_changes_probes_not_groups() -> None:
    """torchvision's blocks call one `relu` module twice: the spec is the same, but that module cannot be a probe
    (its output holds two groups), so a block's inner group is read at bn1 and a residual stream at the outputs of
    the norms that feed its adds (bn2, the downsample's norm)."""
    x = torch.randn(16, 3, 8, 8)
    own = trace_spec(warmed(user_models.ResNet18Style(width=8), x), x).spec
    model = warmed(user_models.ResNet18Style(width=8, shared_relu=True), x)
    shared = trace_spec(model, x).spec
    assert partition(shared) == partition(own)
    verify_spec(model, shared, x)
    assert all("act" not in probe for probes in shared.probes.values() for probe in probes)
    assert set(shared.probes) == set(shared.groups)
    inner = [g for g in shared.groups if g.endswith("conv1") and g != "conv1"]
    assert all(shared.probes[g] == (g.replace("conv1", "bn1"),) for g in inner)
    assert shared.probes["layer2.0.conv2"] == ("layer2.0.downsample.1", "layer2.0.bn2", "layer2.1.bn2")


def test_verification_runs_on_a_crop_only_where_the_logits_keep_their_shape() -> None:
    """Fully convolutional nets are checked on an 8×8 crop (a permutation acts on channels, not positions); a
    flatten into a fixed-size Linear or a positional embedding keeps the full image."""
    x = torch.randn(4, 3, 32, 32)
    resnet = build_builtin("resnet20", {"width": 1.0}, 3, 32, "bn")
    crop = verification_input(resnet, x)
    assert crop.shape == (4, 3, 8, 8) and torch.equal(crop, x[:, :, 12:20, 12:20])
    mlp = build_builtin("mlp", {"hidden": [16]}, 3, 32, "none")
    assert verification_input(mlp, x) is x
    assert verification_input(user_models.ViTStyle(width=8), torch.randn(4, 3, 16, 16)).shape[-1] == 16
    spec, info = checked_spec([resnet, build_builtin("resnet20", {"width": 1.0}, 3, 32, "bn")], x, 10, seed=0)
    assert info["verify_input"] == [4, 3, 8, 8] and spec == resnet.permutation_spec()


@pytest.mark.parametrize("method", ["permute", "weight_matching", "zipit", "ot", "c2m3"])
@pytest.mark.parametrize("arch", list(USER))
def test_merging_a_planted_copy_gives_model_a_back(arch: str, method: str) -> None:
    """Through `mergebench.merge` (traced spec, verification, aligner or strategy, average): B = A under a random
    permutation merges back into A's function, for methods reading weights, activations on dim 1 or channels-last
    (probe views), and through axes made of parts (flatten, cat, chunk, grouped convs). Methods reading
    activations read segments of an axis through segment probes. ZipIt!'s merge matrices cannot move whole heads:
    it leaves them in place (the others' head permutations are placed by weights)."""
    model_a, model_b, _, x, _ = planted(arch, heads=method != "zipit")
    data = (x * 2 + 1, torch.randint(0, 10, (len(x),)))
    options = {
        "zipit": {"align": "zipit", "align_params": {"alpha": 0.3, "beta": 0.0}},
    }.get(method, {"align": method})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, info = mergebench.merge([model_a, model_b], data=data, **options)
    assert info["spec"] == "traced"
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model_a(x), rtol=1e-5, atol=1e-5)


def test_tracing_and_checking_leave_every_modules_mode_as_it_was() -> None:
    """A model in train mode with one submodule frozen in eval mode (a common fine-tuning set-up) comes back so."""
    from mergebench.spec.verify import checked_spec

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    trace_spec(model, torch.randn(4, 4))
    checked_spec([model, model], torch.randn(4, 4), 3, seed=0)
    assert [m.training for m in model.modules()] == before
