"""Permutations of groups made of attention heads: a head permutation σ shared across a tie, then one permutation
within each head per group.

A group of H heads of d units is ordered head by head, so its flat permutation is
perm[h·d + i] = σ(h)·d + τ_h(i): model A's head h takes model B's head σ(h), and A's unit i of that head takes B's
unit τ_h(i) of it. Every consumer of the spec (`apply_transforms`, the check, REPAIR) sees only this flat
permutation; aligners build it with `compose` and the check draws it with `draw_permutations`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mergebench.spec import PermutationSpec

Draw = Callable[[int], Tensor]  # n -> a permutation of n units


def compose(sigma: Tensor, inner: Tensor) -> Tensor:
    """The flat permutation of H heads of d units: `sigma` (H) moves heads, `inner[h]` (H × d) the units of A's
    head h among B's head σ(h)'s units."""
    count, d = inner.shape
    return (sigma[:, None] * d + inner).reshape(count * d)


def decompose(perm: Tensor, count: int) -> tuple[Tensor, Tensor] | None:
    """(σ, inner) of a flat permutation that moves whole heads, or None where it splits a head."""
    d = perm.numel() // count
    blocks = perm.reshape(count, d)
    sigma = torch.div(blocks[:, 0], d, rounding_mode="floor")
    if not torch.equal(torch.div(blocks, d, rounding_mode="floor"), sigma[:, None].expand(count, d)):
        return None
    return sigma, blocks - sigma[:, None] * d


def moves_whole_heads(spec: PermutationSpec, perms: Mapping[str, Tensor]) -> bool:
    """Whether `perms` move every head group by whole heads, with one σ per tie (the tie's own group, if any, σ)."""
    for tie, members in spec.ties().items():
        sigmas = [perms[tie]] if tie in perms else []
        for group in members:
            if group not in perms:
                continue
            split = decompose(perms[group], spec.heads[group].count)
            if split is None:
                return False
            sigmas.append(split[0])
        if any(not torch.equal(s, sigmas[0]) for s in sigmas[1:]):
            return False
    return True


def draw_permutations(spec: PermutationSpec, sizes: Mapping[str, int], draw: Draw) -> dict[str, Tensor]:
    """A permutation for each group of `sizes` (group -> units), in its order, from `draw(n)`; a tie draws σ once (at
    its first group), then each of its groups one permutation per head."""
    ties = spec.ties()
    sigmas: dict[str, Tensor] = {}

    def sigma(tie: str, count: int) -> Tensor:
        if tie not in sigmas:
            sigmas[tie] = draw(count)
        return sigmas[tie]

    out: dict[str, Tensor] = {}
    for group, n in sizes.items():
        if group in spec.heads:
            heads = spec.heads[group]
            s = sigma(heads.tie, heads.count)
            out[group] = compose(s, torch.stack([draw(n // heads.count) for _ in range(heads.count)]))
        elif group in ties:
            out[group] = sigma(group, n)
        else:
            out[group] = draw(n)
    return out
