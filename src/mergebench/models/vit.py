"""A small Vision Transformer for MNIST-sized images (DESIGN §13.3's testbed for head-aware merging).

Patches of `patch`×`patch` pixels embedded by a strided conv, a class token and learned position embeddings, `depth`
pre-norm blocks (multi-head self-attention with one fused qkv projection, as timm writes it, and a GELU MLP), a
final LayerNorm and a linear head on the class token. It has no hand-written spec: the tracer finds its residual
stream, its MLP units and, in every block, the q/k and v groups made of `heads` heads tied by one head permutation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench.errors import ConfigError
from mergebench.models.registry import MODELS, ModelInput

SMOKE_DIM = 32  # smoke=true: the embedding shrinks to at most this many units, and the depth to at most 2 blocks


@dataclasses.dataclass
class ViTParams:
    dim: int = 64
    depth: int = 4
    heads: int = 4
    patch: int = 7
    mlp_ratio: float = 2.0

    def check(self) -> None:
        if min(self.dim, self.depth, self.heads, self.patch) <= 0 or self.mlp_ratio <= 0:
            raise ConfigError("model.dim, depth, heads, patch and mlp_ratio must be positive")
        if self.dim % self.heads:
            raise ConfigError(f"model.dim={self.dim} must be a multiple of model.heads={self.heads}")

    def result_columns(self) -> dict[str, Any]:
        return {"dim": self.dim, "depth": self.depth, "heads": self.heads}

    @staticmethod
    def smoke(values: dict[str, Any]) -> dict[str, Any]:
        heads = int(values.get("heads", 4))
        dim = min(int(values.get("dim", 64)), SMOKE_DIM)
        return {**values, "dim": dim - dim % heads, "depth": min(int(values.get("depth", 4)), 2)}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, data: ModelInput, params: ViTParams) -> None:
        super().__init__()
        tokens = (data.size // params.patch) ** 2
        self.patch = nn.Conv2d(data.channels, params.dim, params.patch, params.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, params.dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, params.dim) * 0.02)
        hidden = round(params.dim * params.mlp_ratio)
        self.blocks = nn.Sequential(*(Block(params.dim, params.heads, hidden) for _ in range(params.depth)))
        self.norm = nn.LayerNorm(params.dim)
        self.head = nn.Linear(params.dim, data.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


@MODELS.register("vit", ViTParams)
def build_vit(params: ViTParams, data: ModelInput) -> ViT:
    if data.size < params.patch:
        raise ConfigError(f"model.patch={params.patch} is larger than the {data.size}×{data.size} images")
    return ViT(data, params)
