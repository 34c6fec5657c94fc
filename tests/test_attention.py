"""Attention heads in the spec: traced from timm's, torchvision's and hand-written attention, checked, drawn and
recovered by whole heads, and merged by every aligner that can move them.

A planted copy here is moved by whole heads (σ one cycle through the heads) and within every head (one cycle
each), as the per-merge check plants it, so an aligner that got the heads or the units within a head wrong, or
moved q without k, cannot give the model's own weights back."""

from __future__ import annotations

import itertools
import json
import re
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mergebench
from mergebench import zoo
from mergebench.align.assignment import assign_heads
from mergebench.spec import Heads, Part, PermutationSpec, ProbeView, apply_transforms
from mergebench.spec.heads import compose, decompose, moves_whole_heads
from mergebench.spec.trace import trace_spec
from mergebench.spec.verify import SpecMismatchError, moving_permutations, verify_spec
from tests.test_zoo import assert_merges_back

ALIGNERS = ["weight_matching", "permute", "ot"]


class HandAttention(nn.Module):
    """The plainest attention: separate q, k, v projections, softmax(q·kᵀ)·v written out, a residual stream."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        b, t, c = x.shape
        q, k, v = (f(x).view(b, t, self.heads, c // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, c))
        return self.head(x.mean(1))

    def permutation_spec(self) -> PermutationSpec:
        """Written by hand: the stream, q/k's heads, v's heads, tied."""
        axes: dict[str, tuple[str | None, ...]] = {"embed.weight": ("x", None), "embed.bias": ("x",)}
        for name, out in (("q", "qk"), ("k", "qk"), ("v", "v")):
            axes |= {f"{name}.weight": (out, "x"), f"{name}.bias": (out,)}
        axes |= {"proj.weight": ("x", "v"), "proj.bias": ("x",), "head.weight": (None, "x"), "head.bias": (None,)}
        heads = {"qk": Heads("heads", 2), "v": Heads("heads", 2)}
        probes = {"x": ("embed",), "qk": ("q", "k"), "v": ("v",)}
        tokens_last = {p: ProbeView(axis=-1) for p in ("embed", "q", "k", "v")}  # [N, T, D]: units on the last axis
        return PermutationSpec(axes=axes, probes=probes, probe_views=tokens_last, heads=heads, residual=("x",))


class MHAModel(nn.Module):
    """A token model around `nn.MultiheadAttention` (packed in_proj), as torchvision's ViT uses it."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        y = self.norm(x)
        a, _ = self.attn(y, y, y, need_weights=False)
        return self.head((x + a).mean(1))


class SDPAModel(nn.Module):
    """The same attention through F.scaled_dot_product_attention and a fused qkv unbound, as timm writes it."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed, self.qkv = nn.Linear(6, dim), nn.Linear(dim, 3 * dim)
        self.proj, self.head = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))
        return self.head(x.mean(1))


def tokens(n: int = 16) -> Tensor:
    return torch.randn(n, 5, 6)


def partition(spec: PermutationSpec) -> set[frozenset[tuple[str, int, int]]]:
    """The spec's groups as sets of (tensor, axis, offset), names aside."""
    out: dict[str, set[tuple[str, int, int]]] = {}
    for name, groups in spec.axes.items():
        for axis, g in enumerate(groups):
            if g is not None:
                out.setdefault(g, set()).add((name, axis, 0))
    for name, by_axis in spec.parts.items():
        for axis, parts in by_axis.items():
            for p in parts:
                if p.group is not None:
                    out.setdefault(p.group, set()).add((name, axis, p.offset))
    return {frozenset(v) for v in out.values()}


def test_the_traced_spec_of_a_hand_written_attention_equals_the_hand_written_one() -> None:
    model = HandAttention()
    traced = trace_spec(model, tokens())
    hand = model.permutation_spec()
    assert traced.warnings == []
    assert partition(traced.spec) == partition(hand)
    rename = dict(zip(traced.spec.groups, hand.groups, strict=True))
    assert {rename[g]: h.count for g, h in traced.spec.heads.items()} == {"qk": 2, "v": 2}
    assert len({h.tie for h in traced.spec.heads.values()}) == 1
    assert [rename[g] for g in traced.spec.residual] == ["x"]
    verify_spec(model, hand, tokens())


@pytest.mark.parametrize("cls", [HandAttention, SDPAModel, MHAModel])
def test_every_attention_form_traces_to_heads_and_passes_the_check(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    traced = trace_spec(model, tokens())
    assert traced.warnings == []
    assert sorted(h.count for h in traced.spec.heads.values()) == [2, 2]
    verify_spec(model, traced.spec, tokens())


@pytest.mark.parametrize("cls", [HandAttention, SDPAModel, MHAModel])
@pytest.mark.parametrize("align", ALIGNERS)
def test_a_planted_head_permutation_merges_back(cls: type[nn.Module], align: str) -> None:
    """Weight matching, activation matching (by weights where the heads sit inside nn.MultiheadAttention) and OT."""
    torch.manual_seed(0)
    model = cls().eval()
    x = tokens(64)
    spec = trace_spec(model, x).spec
    state = model.state_dict()
    planted = cls().eval()
    planted.load_state_dict(apply_transforms(state, spec, moving_permutations(spec, state, seed=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, info = mergebench.merge([model, planted], align=align, agg="avg", data=(x, torch.zeros(64).long()))
    for key, tensor in state.items():
        torch.testing.assert_close(merged.state_dict()[key], tensor, rtol=0, atol=1e-6, msg=key)
    if align == "permute":
        assert info["align_weight_placed_groups"] == (2 if cls is MHAModel else 0)


def test_moving_q_without_k_is_caught_by_the_check() -> None:
    """A spec that puts k in a group of its own (q·kᵀ no longer invariant) or unties v's heads from q/k's."""
    torch.manual_seed(0)
    model, x = SDPAModel().eval(), tokens()
    spec = trace_spec(model, x).spec
    qk, v = spec.parts["qkv.weight"][0][0].group, spec.parts["qkv.weight"][0][2].group
    split = {
        name: {0: (ps[0][0], Part("k alone", ps[0][1].offset, ps[0][1].units), ps[0][2])}
        for name, ps in spec.parts.items()
        if name.startswith("qkv.")
    }
    wrong_k = PermutationSpec(spec.axes, spec.probes, split, spec.probe_views, heads=spec.heads)
    with pytest.raises(SpecMismatchError, match=re.escape(f"permuting group {qk!r}")):  # q moved, k not
        verify_spec(model, wrong_k, x)
    model = SDPAModel(dim=8, heads=4).eval()  # four heads: two independent cycles through them differ
    spec = trace_spec(model, x).spec
    qk, v = spec.parts["qkv.weight"][0][0].group, spec.parts["qkv.weight"][0][2].group
    untied = {qk: Heads("one", 4), v: Heads("another", 4)}
    with pytest.raises(SpecMismatchError):
        verify_spec(model, PermutationSpec(spec.axes, spec.probes, spec.parts, spec.probe_views, heads=untied), x)


def test_head_assignment_is_the_exact_optimum() -> None:
    """Against brute force over every head permutation and every within-head assignment (2 groups, 3 heads of 2)."""
    gen = torch.Generator().manual_seed(0)
    count, d = 3, 2
    costs = [torch.randn(count * d, count * d, generator=gen, dtype=torch.float64) for _ in range(2)]
    own = torch.randn(count, count, generator=gen, dtype=torch.float64)
    perms, sigma = assign_heads(costs, count, own)
    rows = torch.arange(count * d)

    def value(ps: list[Tensor], s: Tensor) -> float:
        return float(sum(c[rows, p].sum() for c, p in zip(costs, ps, strict=True)) + own[torch.arange(count), s].sum())

    best = max(
        value([compose(torch.tensor(s), torch.tensor(i)) for i in inner], torch.tensor(s))
        for s in itertools.permutations(range(count))
        for inner in itertools.product(itertools.product(itertools.permutations(range(d)), repeat=count), repeat=2)
    )
    assert value(perms, sigma) == pytest.approx(best, rel=1e-12)
    assert all(decompose(p, count)[0].equal(sigma) for p in perms)


def test_drawn_permutations_move_whole_heads_and_every_unit() -> None:
    model = SDPAModel(dim=12, heads=3)
    spec = trace_spec(model, tokens()).spec
    perms = {g: t.perm for g, t in moving_permutations(spec, model.state_dict(), seed=0).items()}
    assert moves_whole_heads(spec, perms)
    assert all((p != torch.arange(len(p))).all() for p in perms.values())
    broken = dict(perms)
    group = next(iter(spec.heads))
    broken[group] = perms[group].flip(0).roll(1)  # a unit of one head sent into another
    assert not moves_whole_heads(spec, broken)


def test_a_vit_trains_merges_and_reports_head_aware_alignment(tmp_path: Path) -> None:
    """The built-in `model=vit` (no hand-written spec): traced with its heads, checked, merged by head-aware weight
    matching and by stream-only weight matching (`align.heads=identity`), which reaches a lower objective."""
    from tests.test_plugins import compose_and_run

    common = ["model=vit", "dataset=digits", "model.patch=2", "train.epochs=1", f"cache_dir={tmp_path / 'cache'}"]
    found = {}
    for heads in ("permute", "identity"):
        _, df = compose_and_run([*common, "align=weight_matching", f"align.heads={heads}"], tmp_path / heads)
        merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
        found[heads] = json.loads(merged.diagnostics.iloc[0])
    assert found["permute"]["spec"] == "traced" and found["permute"]["verify_groups"] == 13
    assert found["permute"]["align_objective"] > found["identity"]["align_objective"]
    assert (found["permute"]["align_groups_left"], found["identity"]["align_groups_left"]) == (0, 8)


@pytest.mark.zoo
@pytest.mark.parametrize("align", ["weight_matching", "permute"])
@pytest.mark.parametrize(
    "case",
    [
        zoo.Classifier("timm:vit_tiny_patch16_224", 32, {"img_size": 32, "depth": 2}),
        zoo.Classifier(
            "torchvision.models:VisionTransformer",
            32,
            {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4, "hidden_dim": 32, "mlp_dim": 64},
        ),
        zoo.Classifier(
            "torchvision.models.swin_transformer:SwinTransformer",
            32,
            {"patch_size": [4, 4], "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4], "window_size": [4, 4]},
        ),
    ],
    ids=["timm_vit", "torchvision_vit", "torchvision_swin"],
)
def test_zoo_transformers_merge_a_planted_head_permutation_back(
    case: zoo.Classifier, align: str, modules: tuple[ModuleType, ModuleType]
) -> None:
    assert_merges_back(case, align)
    spec = trace_spec(case.build(10), torch.randn(2, 3, case.side, case.side)).spec
    assert spec.heads and all(g in spec.groups for g in spec.heads)
