"""Coverage of the traced spec: axes cut into segments (chunk/split/unbind/tensor_split/slices/narrow, GLU gates,
fused qkv), grouped convs, GroupNorm, views that cut or merge a permuted axis (followed as products, or named in a
warning), and axes with parts on two sides. Every spec is checked the way a merge checks it (a random permutation
of every group keeps the logits: `verify_spec`) and by weight matching undoing a planted permutation exactly; a
spec that claims more than the model allows is refused by the check."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, fx, nn

from mergebench.align.weight_matching import weight_matching
from mergebench.spec import Heads, Part, PermutationSpec, Transform, apply_transforms, random_permutations
from mergebench.spec.trace import trace_spec
from mergebench.spec.verify import SpecMismatchError, verify_spec
from tests import user_models
from tests.test_trace import warmed

LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def hidden_unit_coverage(model: nn.Module, spec: PermutationSpec, x: Tensor) -> float:
    """The fraction of hidden units (every conv/linear output channel but the logits') in a permutation group."""
    outputs: dict[str, Tensor] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LAYERS)}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, o)) for n, m in layers.items()]
    with torch.no_grad():
        logits = model.eval()(x)
    for hook in hooks:
        hook.remove()
    total = covered = 0
    for name, layer in layers.items():
        if outputs[name] is logits:
            continue
        key, units = f"{name}.weight", layer.weight.shape[0]
        total += units
        if spec.axes[key][0] is not None:
            covered += units
        else:
            covered += sum(p.size for p in spec.parts.get(key, {}).get(0, ()) if p.group is not None)
    return covered / total


def check_exact(model: nn.Module, x: Tensor) -> PermutationSpec:
    """The traced spec, after the merge's own check and weight matching undoing a planted permutation exactly."""
    model = warmed(model, x)
    spec = trace_spec(model, x).spec
    verify_spec(model, spec, x, seed=3)
    state = model.state_dict()
    planted = apply_transforms(state, spec, random_permutations(spec, state, seed=7))
    perms, _ = weight_matching(spec, state, planted, seed=0)
    back = apply_transforms(planted, spec, {g: Transform.permutation(p) for g, p in perms.items()})
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)
    return spec


# ---- segments -------------------------------------------------------------------------------------------------
CUTS: dict[str, Callable[[Tensor], tuple[Tensor, ...]]] = {
    "method chunk": lambda h: h.chunk(2, dim=1),
    "torch.chunk": lambda h: torch.chunk(h, 2, 1),
    "method split": lambda h: h.split([3, 5], dim=1),
    "torch.split": lambda h: torch.split(h, 4, dim=1),
    "method tensor_split": lambda h: h.tensor_split([3], dim=1),
    "torch.tensor_split": lambda h: torch.tensor_split(h, 2, dim=1),
    "slices": lambda h: (h[:, :3], h[:, 3:]),
    "narrow": lambda h: (h.narrow(1, 0, 3), torch.narrow(h, 1, 3, 5)),
}


class TwoConsumers(nn.Module):
    """fc1's 8 units cut in two; each piece feeds its own layer."""

    def __init__(self, cut: Callable[[Tensor], tuple[Tensor, ...]]) -> None:
        super().__init__()
        self.cut = cut
        first, second = (t.shape[1] for t in cut(torch.zeros(1, 8)))
        self.fc1, self.norm = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.fa, self.fb = nn.Linear(first, 5), nn.Linear(second, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.cut(torch.relu(self.norm(self.fc1(x))))
        return self.out(torch.relu(self.fa(a)) + torch.relu(self.fb(b)))


@pytest.mark.parametrize("form", list(CUTS))
def test_an_axis_cut_into_pieces_gets_a_permutation_per_piece(form: str) -> None:
    torch.manual_seed(0)
    model = TwoConsumers(CUTS[form])
    x = torch.randn(32, 6)
    traced = trace_spec(model, x)
    assert traced.warnings == []
    spec = check_exact(model, x)
    first = model.fa.in_features
    a, b = spec.axes["fa.weight"][1], spec.axes["fb.weight"][1]
    assert a is not None and b is not None and a != b
    expected = (Part(a, 0, first), Part(b, first, 8 - first))
    for key in ("fc1.weight", "fc1.bias", "norm.weight", "norm.running_mean", "norm.running_var"):
        assert spec.parts[key] == {0: expected}, key
    assert hidden_unit_coverage(model, spec, x) == 1.0
    wrong = dict(spec.parts)
    del wrong["norm.running_var"]  # one tensor of the piece forgotten: the check must see it
    with pytest.raises(SpecMismatchError, match="in eval mode"):
        verify_spec(model, PermutationSpec(spec.axes, spec.probes, wrong), x)


class Gated(nn.Module):
    """A GLU gate on a conv map: `a, g = conv(x).chunk(2, 1)`, `a * sigmoid(g)` pairs unit i of a with unit i of g."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.conv1(x).chunk(2, dim=1)
        return self.head(torch.relu(self.conv2(a * torch.sigmoid(gate))).mean((2, 3)))


def test_a_glu_gate_moves_both_halves_by_one_permutation() -> None:
    torch.manual_seed(0)
    model, x = Gated(), torch.randn(8, 3, 6, 6)
    spec = check_exact(model, x)
    group = spec.axes["conv2.weight"][1]
    assert spec.parts["conv1.weight"] == {0: (Part(group, 0, 6), Part(group, 6, 6))}
    wrong = {**spec.parts, "conv1.weight": {0: (Part(group, 0, 6), Part(None, 6, 6))}}  # the gate left behind
    with pytest.raises(SpecMismatchError):
        verify_spec(model, PermutationSpec(spec.axes, spec.probes, wrong), x)


def test_fused_qkv_split_on_the_last_axis_shares_q_and_k() -> None:
    """q·kᵀ is kept by one permutation of q's and k's units and v and the output projection's input have their
    own, each made of the block's 2 heads of 4 units, tied by one head permutation."""
    torch.manual_seed(0)
    model, x = user_models.GatedTransformerStyle(width=8), torch.randn(16, 3, 8, 8)
    spec = check_exact(model, x)
    parts = spec.parts["blocks.0.attn.qkv.weight"][0]
    assert [(p.offset, p.units, p.block) for p in parts] == [(0, 8, 1), (8, 8, 1), (16, 8, 1)]
    qk, v = parts[0].group, parts[2].group
    assert parts[1].group == qk != v
    assert spec.axes["blocks.0.attn.proj.weight"] == (spec.axes["blocks.0.attn.proj.weight"][0], v)
    assert spec.heads[qk] == spec.heads[v] == Heads(spec.heads[qk].tie, 2)
    hidden = spec.axes["blocks.0.mlp.fc2.weight"][1]  # SwiGLU: the value half and the gate half move together
    assert spec.parts["blocks.0.mlp.fc1.weight"] == {0: (Part(hidden, 0, 16), Part(hidden, 16, 16))}
    assert hidden_unit_coverage(model, spec, x) == 1.0


class Unbound(nn.Module):
    """q, k, v stacked by a view and unbound: the stacking axis is one unit per tensor, the dims one group."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 12), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).view(-1, 3, 4).unbind(1)
        return self.out(torch.relu(q * k + v))


def test_unbind_of_a_stacked_axis_keeps_the_dims_permuted() -> None:
    torch.manual_seed(0)
    model, x = Unbound(), torch.randn(8, 6)
    traced = trace_spec(model, x)
    assert traced.warnings == []
    spec = check_exact(model, x)
    group = spec.axes["out.weight"][1]
    assert spec.parts["qkv.weight"] == {0: (Part(group, 0, 4), Part(group, 4, 4), Part(group, 8, 4))}


# ---- grouped convolutions -------------------------------------------------------------------------------------
class GroupedBottleneck(nn.Module):
    """1×1 conv → BN → 3×3 conv with 3 groups (12 → 6 channels) → BN → 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(torch.relu(self.conv3(y)).mean((2, 3)))


def test_grouped_conv_shares_one_permutation_across_input_blocks_and_one_per_output_block() -> None:
    torch.manual_seed(0)
    model, x = GroupedBottleneck(), torch.randn(8, 3, 6, 6)
    traced = trace_spec(model, x)
    assert traced.warnings == []
    spec = check_exact(model, x)
    shared = spec.axes["conv2.weight"][1]
    assert spec.parts["conv1.weight"] == {0: tuple(Part(shared, 4 * g, 4) for g in range(3))}
    assert spec.parts["bn1.running_var"] == spec.parts["conv1.weight"]
    blocks = [p.group for p in spec.parts["conv2.weight"][0]]
    assert len(set(blocks)) == 3 and shared not in blocks
    assert spec.parts["conv3.weight"] == {1: tuple(Part(g, 2 * i, 2) for i, g in enumerate(blocks))}
    assert hidden_unit_coverage(model, spec, x) == 1.0
    # a permutation of its own per input block does not hold: block g's weights read it through one axis 1
    own = tuple(Part(name, 4 * g, 4) for g, name in enumerate(["x0", "x1", "x2"]))
    wrong = {**spec.parts, "conv1.weight": {0: own}, "bn1.running_var": {0: own}}
    axes = {**spec.axes, "conv2.weight": (None, None, None, None)}
    with pytest.raises(SpecMismatchError):
        verify_spec(model, PermutationSpec(axes, spec.probes, wrong), x)


def test_depthwise_conv_with_a_channel_multiplier_moves_output_blocks_with_their_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2),
    )  # fmt: skip
    x = torch.randn(8, 3, 6, 6)
    spec = check_exact(model, x)
    assert spec.parts["2.weight"] == {0: (Part("0", 0, 4, 2),)}
    assert spec.axes["2.weight"] == (None, None, None, None)


@pytest.mark.parametrize(("se", "groups"), [(True, 35), (False, 31)])
def test_regnet_style_blocks_are_fully_covered(se: bool, groups: int) -> None:
    """RegNetY (grouped conv, squeeze-excitation) and RegNetX (a ResNeXt bottleneck): every hidden unit in a group
    (37 % and 44 % before grouped convs were followed)."""
    torch.manual_seed(0)
    model, x = user_models.RegNetStyle(width=8, se=se), torch.randn(16, 3, 8, 8)
    traced = trace_spec(model, x)
    assert traced.warnings == [] and len(traced.spec.groups) == groups
    spec = check_exact(model, x)
    assert hidden_unit_coverage(model, spec, x) == 1.0


def test_group_norm_gets_a_permutation_per_group() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    spec = check_exact(model, x)
    first, second = (p.group for p in spec.parts["1.weight"][0])
    assert first != second and spec.parts["0.weight"] == {0: (Part(first, 0, 4), Part(second, 4, 4))}
    one = {**spec.parts, **{k: {0: (Part(first, 0, 4), Part(first, 4, 4))} for k in ("0.weight", "0.bias")}}
    one = {**one, **{k: {0: (Part(first, 0, 4), Part(first, 4, 4))} for k in ("1.weight", "1.bias")}}
    one["3.weight"] = {1: (Part(first, 0, 4), Part(first, 4, 4))}
    verify_spec(model, PermutationSpec(spec.axes, spec.probes, one), x)  # one shared permutation holds too
    merged = {k: {0: (Part(first, 0, 8),)} for k in ("0.weight", "0.bias", "1.weight", "1.bias")}
    merged["3.weight"] = {1: (Part(first, 0, 8),)}  # but not one across the two groups
    with pytest.raises(SpecMismatchError):
        verify_spec(model, PermutationSpec(spec.axes, spec.probes, {**spec.parts, **merged}), x)


@pytest.mark.parametrize("groups", [1, 8])
def test_group_norm_of_one_group_or_one_channel_per_group_keeps_the_channels_free(groups: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(groups, 8), nn.ReLU(), nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip
    spec = check_exact(model, torch.randn(8, 3, 6, 6))
    assert spec.axes["1.weight"] == ("0",) and spec.axes["3.weight"][1] == "0" and not spec.parts


# ---- views that cut or merge a permuted axis ------------------------------------------------------------------
class CutByView(nn.Module):
    """Linear(4→8) → view(N, 2, 4) → Linear(4→3) on the last axis (the issue's three-layer toy)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)).view(-1, 2, 4)))).flatten(1)


def test_a_view_that_cuts_a_permuted_axis_is_followed_exactly() -> None:
    """The 8 units are 2 blocks of 4 dims: one permutation of the 4 dims inside both blocks (it left 0 groups and
    no warning before)."""
    torch.manual_seed(0)
    model, x = CutByView(), torch.randn(8, 4)
    traced = trace_spec(model, x)
    assert traced.warnings == []
    spec = check_exact(model, x)
    group = spec.axes["fc2.weight"][1]
    assert spec.parts["fc1.weight"] == {0: (Part(group, 0, 4), Part(group, 4, 4))}
    assert set(spec.groups) == {group, "fc2"}


class Decoder(nn.Module):
    """A Linear's output viewed as a C×H×W map for a conv: C units of H·W entries."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv, self.head = nn.Linear(4, 3 * 16), nn.Conv2d(3, 5, 3, padding=1), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.fc(x)).view(-1, 3, 4, 4)
        return self.head(torch.relu(self.conv(y)).mean((2, 3)))


def test_a_view_into_a_map_keeps_the_channel_factor() -> None:
    torch.manual_seed(0)
    model, x = Decoder(), torch.randn(8, 4)
    spec = check_exact(model, x)
    assert spec.parts["fc.weight"] == {0: (Part("fc", 0, 3, 16),)}


class Regrouped(nn.Module):
    """An axis of 12 units viewed as 2×6, then regrouped as 3×4: no spec follows units through that."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 12), nn.Linear(4, 5), nn.Linear(15, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.fc1(x)).view(-1, 2, 6).view(-1, 3, 4)
        return self.fc3(torch.relu(self.fc2(y)).flatten(1))


def test_a_view_that_regroups_a_permuted_axis_is_named() -> None:
    torch.manual_seed(0)
    model, x = Regrouped(), torch.randn(8, 4)
    traced = trace_spec(model, x)
    assert len(traced.warnings) == 1 and "regroups axes [2, 6]" in traced.warnings[0]
    assert "user_models" not in traced.warnings[0] and "test_trace_coverage.py" in traced.warnings[0]
    assert traced.spec.axes["fc1.weight"][0] is None and "fc1.weight" not in traced.spec.parts
    check_exact(model, x)


class QKNormAttention(nn.Module):
    """Attention with a LayerNorm over each head's units of q and k (timm's `qk_norm`): one scale vector for every
    head, so units cannot move differently in different heads."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed, self.qkv, self.proj = nn.Linear(3, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.LayerNorm(dim // heads), nn.LayerNorm(dim // heads)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (self.q_norm(q) @ self.k_norm(k).transpose(-2, -1)).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, c))
        return self.head(x.mean(1))


def test_a_view_of_two_permuted_axes_keeps_one_and_names_the_other() -> None:
    """Heads × units of a head, where a parameter (a per-head-unit norm scale) reads the units of every head: the
    heads cannot move as heads of their own, only one factor of the product can be permuted, and the one left out
    is named. The v side, which no such parameter reads, keeps its heads."""
    torch.manual_seed(0)
    model, x = QKNormAttention(), torch.randn(16, 5, 3)
    traced = trace_spec(model, x)
    assert traced.warnings and all("only the 4-unit factor stays permuted" in w for w in traced.warnings)
    spec = check_exact(model, x)
    assert hidden_unit_coverage(model, spec, x) == 1.0


@pytest.mark.parametrize("shuffle", [True, False])
def test_shufflenet_style_split_and_shuffle_are_followed_exactly(shuffle: bool) -> None:
    """The stride-1 unit's chunk gives its halves a permutation each; the channel shuffle (view → transpose →
    reshape) interleaves the concatenated halves (entry 2u + s is unit u of half s), so each half keeps its own
    permutation, read through strided parts by the next unit's chunk and convs."""
    torch.manual_seed(0)
    model, x = user_models.ShuffleNetStyle(width=8, shuffle=shuffle), torch.randn(16, 3, 8, 8)
    traced = trace_spec(model, x)
    assert traced.warnings == []
    spec = check_exact(model, x)
    assert hidden_unit_coverage(model, spec, x) == 1.0
    if shuffle:  # the next unit's branch reads the shuffled second half: two groups, every other channel each
        reads = spec.parts["stages.1.branch2.0.weight"][1]
        assert [(p.offset, p.units, p.stride) for p in reads] == [(0, 4, 2), (1, 4, 2)]
        assert reads[0].group != reads[1].group
        assert {p.stride for p in spec.parts["conv5.0.weight"][1]} == {2, 4}  # a shuffle of a shuffled half


class OddShuffle(nn.Module):
    """Two 3-channel convs concatenated, shuffled (groups 2) and cut 4 + 2: the cut falls inside a round of the
    interleave, so the first piece holds 2 units of each conv and the second 1 of each."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.c, self.d = nn.Conv2d(4, 5, 1), nn.Conv2d(2, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        n, _, h, w = y.shape
        y = y.view(n, 2, 3, h, w).transpose(1, 2).reshape(n, 6, h, w)
        first, second = y.split([4, 2], dim=1)
        return self.fc((torch.relu(self.c(first)) + torch.relu(self.d(second))).mean([2, 3]))


def test_a_cut_inside_a_round_of_a_channel_shuffle_splits_each_member_where_it_falls() -> None:
    torch.manual_seed(0)
    model, x = OddShuffle(), torch.randn(8, 3, 4, 4)
    traced = trace_spec(model, x)
    assert traced.warnings == []
    spec = check_exact(model, x)
    reads = spec.parts["c.weight"][1]  # entries a0 b0 a1 b1: a's first two units, then b's
    assert [(p.offset, p.units, p.stride) for p in reads] == [(0, 2, 2), (1, 2, 2)]
    assert spec.parts["a.weight"][0][0].group == reads[0].group


def test_strided_parts_move_their_units_in_place_and_split_for_scoring() -> None:
    """An axis interleaving two groups (a at entries 0, 2, 4; b at 1, 3, 5): each group's permutation moves only
    its own entries, and `plain_view` hands each group's units to the scorer in unit order."""
    parts = (Part("a", 0, 3, 1, 2), Part("b", 1, 3, 1, 2))
    spec = PermutationSpec(axes={"w": (None, None)}, probes={}, parts={"w": {1: parts}})
    w = torch.arange(12.0).reshape(2, 6)
    moved = apply_transforms({"w": w}, spec, {"a": Transform.permutation(torch.tensor([2, 0, 1]))})["w"]
    assert moved[0].tolist() == [4.0, 1.0, 0.0, 3.0, 2.0, 5.0]
    _, plain = spec.plain_view({"w": w})
    assert plain["w#0"].squeeze(-1)[0].tolist() == [0.0, 2.0, 4.0]
    assert plain["w#1"].squeeze(-1)[0].tolist() == [1.0, 3.0, 5.0]


class Straddling(nn.Module):
    """4 units repeated 3 times added to 6 units repeated twice: no unit of one side lines up with the other's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(3, 6), nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.fc1(x)).unsqueeze(-1).expand(-1, 4, 3).flatten(1)
        b = torch.relu(self.fc2(x)).unsqueeze(-1).expand(-1, 6, 2).flatten(1)
        return self.fc3(a + b)


def test_axes_whose_units_straddle_are_fixed_and_named() -> None:
    torch.manual_seed(0)
    model, x = Straddling(), torch.randn(8, 3)
    traced = trace_spec(model, x)
    assert len(traced.warnings) == 1 and "units do not line up" in traced.warnings[0]
    assert traced.spec.groups == []
    verify_spec(model, traced.spec, x)


# ---- parts on two axes, ops kept from before -------------------------------------------------------------------
class CatThenChunk(nn.Module):
    """A 1×1 conv reading cat([a, b]) whose output is chunked: its weight has parts on both axes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.mix = nn.Conv2d(6, 10, 1)
        self.p, self.q = nn.Conv2d(4, 3, 1), nn.Conv2d(6, 3, 1)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.mix(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1))))
        first, second = y.split([4, 6], dim=1)
        return self.head((torch.relu(self.p(first)) + torch.relu(self.q(second))).mean((2, 3)))


def test_parts_on_two_axes_are_scored_and_moved_exactly() -> None:
    torch.manual_seed(0)
    model, x = CatThenChunk(), torch.randn(8, 3, 6, 6)
    spec = check_exact(model, x)
    assert set(spec.parts["mix.weight"]) == {0, 1}
    plain, state = spec.plain_view(model.state_dict())
    pieces = [k for k in state if k.startswith("mix.weight#")]
    assert len(pieces) == 4 and all(plain.axes[k][0] is not None and plain.axes[k][2] is not None for k in pieces)
    assert sum(state[k].numel() for k in pieces) == model.mix.weight.numel()


@fx.wrap
def stochastic_depth(x: Tensor, p: float, mode: str, training: bool) -> Tensor:
    """torchvision.ops.stochastic_depth's name and signature, kept whole by fx as torchvision keeps it."""
    return x


class ScaledBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        y = torch.addcmul(h, self.fc2(h), self.scale, value=0.5)
        y = torch.addcdiv(y, h, self.scale, value=0.1).lerp(h, 0.3)
        return self.fc3(stochastic_depth(y, 0.2, "row", self.training))


def test_stochastic_depth_addcmul_addcdiv_lerp_keep_their_axes() -> None:
    torch.manual_seed(0)
    model, x = ScaledBlocks(), torch.randn(8, 4)
    traced = trace_spec(model, x)
    assert traced.warnings == []
    spec = check_exact(model, x)
    group = spec.axes["fc1.weight"][0]
    assert group is not None and spec.axes["scale"] == (group,) and spec.axes["fc2.weight"] == (group, group)
