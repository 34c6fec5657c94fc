"""CCA Merge (Horoi et al.): per group, a dense map carrying B's units into A's canonical basis.

From the streamed covariances of A's and B's probe outputs (every spatial position a sample), with γ·I added
to both within-model covariances: M = Σ_A^-½ Σ_AB Σ_B^-½ = U S Vᵀ, and the map that takes B's activations
to A's units through the shared canonical variates is T = Σ_A^½ U Vᵀ Σ_B^-½ (T⁻¹ = Σ_B^½ V Uᵀ Σ_A^-½).
T goes on B's output axes and T⁻¹ on the consuming input axes. γ is chosen from a log grid by the accuracy
of the α = 0.5 merge on the selection data (the CCA Merge code chose it on test data; see select_on); the
candidates are judged after a BatchNorm reset, because a dense map carries BN running variances only
approximately (see `apply_transforms`) — with BN nets, follow CCA with repair=reset_bn.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import Tensor, nn

from mergebench.align.activations import GroupStats, activation_stats
from mergebench.align.registry import ALIGNERS, PairAlignment, pairwise_aligner
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.evaluate import evaluate_batches, selection_key
from mergebench.spec import Transform, apply_transforms
from mergebench.weights import mean_model


@dataclasses.dataclass
class CCAParams:
    gamma: float | None = None
    gamma_grid: list[float] = dataclasses.field(default_factory=lambda: [10.0**e for e in range(-6, 8)])
    batch_size: int | None = None

    def check(self) -> None:
        if self.gamma is not None and self.gamma <= 0:
            raise ConfigError(f"gamma={self.gamma} must be > 0, or null (search the grid)")
        if not self.gamma_grid or min(self.gamma_grid) <= 0:
            raise ConfigError(f"gamma_grid={self.gamma_grid} must be a non-empty list of values > 0")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive integer or null (eval batch size)")

    @staticmethod
    def smoke(values: dict[str, Any]) -> dict[str, Any]:
        """smoke=true: the γ search tries every fourth value of the grid (1e-6, 1e-2, …)."""
        if "gamma_grid" in values:
            return {**values, "gamma_grid": values["gamma_grid"][::4]}
        return values


@dataclasses.dataclass(frozen=True)
class _Eig:
    """A symmetric PSD matrix's eigendecomposition, so Σ + γI raised to ±½ costs two matmuls per γ."""

    values: Tensor
    vectors: Tensor

    @staticmethod
    def of(cov: Tensor) -> _Eig:
        values, vectors = torch.linalg.eigh(cov.double())
        return _Eig(values.clamp_min(0), vectors)

    def power(self, gamma: float, exponent: float) -> Tensor:
        return (self.vectors * (self.values + gamma).pow(exponent)) @ self.vectors.T


class CCAMaps:
    """Per-group CCA maps for any γ, from one set of streamed statistics (eigendecompositions done once)."""

    def __init__(self, stats: dict[str, GroupStats]) -> None:
        self.parts = {g: (_Eig.of(s.cov_a), _Eig.of(s.cov_b), s.cov_ab.double()) for g, s in stats.items()}

    def transforms(self, gamma: float) -> tuple[dict[str, Transform], float]:
        """Every group's map for ridge γ, and the mean canonical correlation over all groups' directions."""
        out, correlations = {}, []
        for group, (eig_a, eig_b, cov_ab) in self.parts.items():
            a_isqrt, b_isqrt = eig_a.power(gamma, -0.5), eig_b.power(gamma, -0.5)
            u, s, vh = torch.linalg.svd(a_isqrt @ cov_ab @ b_isqrt)
            rotation = u @ vh
            matrix = eig_a.power(gamma, 0.5) @ rotation @ b_isqrt
            inverse = eig_b.power(gamma, 0.5) @ rotation.T @ a_isqrt
            out[group] = Transform.dense(matrix, inverse)
            correlations.append(s)
        return out, torch.cat(correlations).mean().item()


def _score(ctx: MergeContext, ref: nn.Module, other: nn.Module, transforms: dict[str, Transform]) -> dict[str, float]:
    aligned = apply_transforms(other.state_dict(), ctx.spec, transforms)
    return evaluate_batches(mean_model([ref.state_dict(), aligned], ctx), ctx.select_batches())


@ALIGNERS.register("cca", CCAParams, label="CCA Merge", abbrev="CCA")
@pairwise_aligner
def align_cca(params: CCAParams, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> PairAlignment:
    start = time.perf_counter()
    batches = ctx.fit_batches(batch_size=params.batch_size or ctx.eval_batch_size)
    maps = CCAMaps(activation_stats(ctx.spec, ref, other, batches))
    if params.gamma is not None:
        transforms, mean_corr = maps.transforms(params.gamma)
        diagnostics = {"gamma": params.gamma, "gamma_searched": False, "mean_corr": mean_corr}
    else:
        best: tuple[tuple[float, float], float, dict[str, Transform], float, dict[str, float]] | None = None
        for gamma in params.gamma_grid:
            candidate, mean_corr = maps.transforms(gamma)
            result = _score(ctx, ref, other, candidate)
            key = selection_key(result)
            if best is None or key > best[0]:
                best = key, gamma, candidate, mean_corr, result
        assert best is not None
        _, gamma, transforms, mean_corr, result = best
        diagnostics = {
            "gamma": gamma,
            "gamma_searched": True,
            "mean_corr": mean_corr,
            "select_on": ctx.select_on,
            "select_top1": result["top1"],
            "select_loss": result["loss"],
        }
    diagnostics["seconds"] = time.perf_counter() - start
    return PairAlignment(transforms, diagnostics)
