"""C2M3 (Crisostomi et al., NeurIPS 2024): cycle-consistent matching of K models through a shared universe.

Every model k gets, per group, a permutation P_k carrying its units into one universe; model j reaches model i's
basis by P_iᵀ P_j (universe, then back out), so the maps between any pair compose around every cycle exactly, which
K − 1 independent alignments to model 0 do not promise. The permutations maximise

    Σ_{i<j} Σ_w ⟨P_i(W_i), P_j(W_j)⟩ = ½ (‖Σ_k P_k(W_k)‖² − Σ_k ‖P_k(W_k)‖²)      (P_k on every grouped axis of w)

over every parameter and every group at once (no data), by Frank–Wolfe on the relaxation to doubly-stochastic
matrices: from the identity, the gradient's linear assignment per (model, group) is the vertex to move to (model
0's map stays the identity: see `universe_matching`), and the step along it is exact — along the segment from Q
to the vertex P the objective is a polynomial of degree 2·(grouped axes per tensor), whose coefficients come from
the P/Q mixtures of each tensor, maximised on [0, 1]; a step is kept only if it raises the objective, so the
history never decreases. At the end each relaxed P_k is projected to the nearest permutation (linear assignment).
BN running statistics are not scored (they ride along with their group, as in weight matching).

As an aligner it carries every model into model 0's basis through the universe (model 0 stays as it is); the
strategy then aggregates and repairs, so `align=c2m3 agg=avg` is the paper's merge (its average in the universe is
the same network up to a permutation).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from numpy.polynomial import polynomial
from torch import Tensor, nn

from mergebench.align.assignment import assign
from mergebench.align.registry import ALIGNERS, Alignment
from mergebench.align.weight_matching import parameters
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.spec import PermutationSpec, Transform

PATIENCE = 5  # stop after this many steps in a row that each gain less than a relative RELATIVE_GAIN
RELATIVE_GAIN = 1e-7


def _apply(t: Tensor, axis: int, op: Tensor) -> Tensor:
    """`op` on one axis of `t`: a float matrix M gives Σ_j M[i, j]·t[j], an index vector p gives t[p[i]]."""
    if op.dtype == torch.long:
        return t.index_select(axis, op)
    return torch.tensordot(op, t, dims=([1], [axis])).movedim(0, axis).contiguous()  # later reads are flat


def _unfold(t: Tensor, axis: int) -> Tensor:
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def _bernstein(m: int, s: int, d: int) -> int:
    """The coefficient of γ^d in (1 − γ)^(m − s)·γ^s."""
    return math.comb(m - s, d - s) * (-1) ** (d - s) if s <= d <= m else 0


class _Problem:
    """The models' scored tensors (float64, plain view) and, per Frank–Wolfe iteration, the variants of them it
    needs: model k's tensor with, on each grouped axis, its current matrix Q ("Q"), the vertex P ("P", an index
    vector) or nothing ("I"). Variants are built axis by axis and share their prefixes, so the iterate, the
    gradient's partial maps and the line search's P/Q mixtures cost four products of a 2-axis tensor, not sixteen.
    Model 0 is the universe's basis and stays as it is."""

    def __init__(self, spec: PermutationSpec, states: list[Mapping[str, Tensor]]) -> None:
        plain, first = spec.plain_view(states[0])
        self.names = [k for k, g in plain.axes.items() if k in first and any(g) and first[k].is_floating_point()]
        self.groups = {k: plain.axes[k] for k in self.names}
        self.grouped = {k: [axis for axis, g in enumerate(self.groups[k]) if g is not None] for k in self.names}
        views = [first] + [spec.plain_view(s)[1] for s in states[1:]]
        self.tensors = [{k: v[k].detach().double() for k in self.names} for v in views]
        self.sizes = {g: plain.group_size(g, first) for g in spec.groups}
        self.device = first[self.names[0]].device
        self.memo: dict[tuple[int, str, str], Tensor] = {}

    def variant(self, k: int, name: str, choice: str, ops: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """Model k's tensor with ops[choice[i]] (a per-group matrix or index vector) on its i-th grouped axis."""
        key = (k, name, choice)
        if key not in self.memo:
            if not choice:
                self.memo[key] = self.tensors[k][name]
            else:
                t = self.variant(k, name, choice[:-1], ops)
                axis = self.grouped[name][len(choice) - 1]
                self.memo[key] = t if choice[-1] == "I" else _apply(t, axis, ops[choice[-1]][self.groups[name][axis]])
        return self.memo[key]

    def mapped(self, ops: list[Mapping[str, Mapping[str, Tensor]]], letter: str) -> list[dict[str, Tensor]]:
        """Every model in the universe with ops[k − 1][letter] on all its grouped axes (model 0 as it is)."""
        out = [self.tensors[0]]
        for k, model_ops in enumerate(ops, start=1):
            out.append({n: self.variant(k, n, letter * len(self.grouped[n]), model_ops) for n in self.names})
        return out

    def objective(self, mapped: list[dict[str, Tensor]]) -> float:
        """Σ_{i<j} ⟨U_i, U_j⟩ over every tensor, pair by pair (no cancellation between large sums)."""
        total = 0.0
        for i, j in itertools.combinations(range(len(mapped)), 2):
            total += sum(float(torch.vdot(mapped[i][n].reshape(-1), mapped[j][n].reshape(-1))) for n in self.names)
        return total

    def gradients(
        self, ops: list[Mapping[str, Mapping[str, Tensor]]], mapped: list[dict[str, Tensor]]
    ) -> list[dict[str, Tensor]]:
        """∂/∂Q_k^g of the objective: Σ over g's axes a of unfold_a(Σ_{j≠k} U_j)·unfold_a(model k mapped on its other
        axes)ᵀ."""
        grads = [
            {g: torch.zeros(n, n, dtype=torch.float64, device=self.device) for g, n in self.sizes.items()} for _ in ops
        ]
        for n in self.names:
            together = sum(u[n] for u in mapped)
            m = len(self.grouped[n])
            for k, model_ops in enumerate(ops, start=1):
                others = together - mapped[k][n]
                for pos, axis in enumerate(self.grouped[n]):
                    partial = self.variant(k, n, "Q" * pos + "I" + "Q" * (m - pos - 1), model_ops)
                    grads[k - 1][self.groups[n][axis]] += _unfold(others, axis) @ _unfold(partial, axis).T
        return grads

    def line(self, ops: list[Mapping[str, Mapping[str, Tensor]]]) -> np.ndarray:
        """The objective at Q + γ(P − Q) as polynomial coefficients in γ (lowest first): on a tensor with m grouped
        axes, model k moves as Σ_S (1 − γ)^(m − |S|) γ^|S| (P on the axes in S, Q on the others)."""
        degree = max(len(a) for a in self.grouped.values())
        coefs = np.zeros(2 * degree + 1)
        for n in self.names:
            m = len(self.grouped[n])
            terms = [[self.tensors[0][n], *[torch.zeros_like(self.tensors[0][n])] * m]]
            for k, model_ops in enumerate(ops, start=1):
                variants = {c: self.variant(k, n, "".join(c), model_ops) for c in itertools.product("QP", repeat=m)}
                coefficients = [
                    [(_bernstein(m, c.count("P"), d), v) for c, v in variants.items()] for d in range(m + 1)
                ]
                terms.append([sum(b * v for b, v in pairs if b) for pairs in coefficients])
            for i, j in itertools.combinations(range(len(terms)), 2):
                for d, e in itertools.product(range(m + 1), repeat=2):
                    coefs[d + e] += float(torch.vdot(terms[i][d].reshape(-1), terms[j][e].reshape(-1)))
        return coefs


def _best_step(coefs: np.ndarray) -> float:
    """The γ in [0, 1] maximising the polynomial."""
    roots = polynomial.polyroots(polynomial.polyder(coefs))
    candidates = [0.0, 1.0, *(float(r.real) for r in roots if abs(r.imag) < 1e-12 and 0 < r.real < 1)]
    return max(candidates, key=lambda g: polynomial.polyval(g, coefs))


def universe_matching(
    spec: PermutationSpec, states: list[Mapping[str, Tensor]], *, max_iter: int = 200
) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """Per model and group, the permutation `u` into the universe (universe unit i is the model's unit u[i], on
    CPU), and diagnostics: `history` is the relaxed objective at the start and after every step (never
    decreasing), `objective` the one of the projected permutations.

    The universe is model 0's basis (its map fixed to the identity). The objective does not change when every map
    is followed by one common permutation, and left free, all K maps move from the identity towards mutually
    inverse vertices: the iterates average over those equivalent solutions and project badly (measured: 0% of
    the units of a planted K = 2 MLP recovered, against 100% with model 0 fixed).

    A step is kept only if the objective, evaluated afresh at the new point, is higher than before it; the run
    stops when no step gains, after `max_iter` steps, or after PATIENCE steps in a row that each gain less than a
    relative RELATIVE_GAIN."""
    start = time.perf_counter()
    problem = _Problem(spec, states)
    eye = {g: torch.eye(n, dtype=torch.float64, device=problem.device) for g, n in problem.sizes.items()}
    mats = [dict(eye) for _ in states[1:]]
    previous: list[dict[str, Tensor]] = mats
    history: list[float] = []
    flat = 0
    while True:
        problem.memo.clear()
        ops = [{"Q": q} for q in mats]
        mapped = problem.mapped(ops, "Q")
        value = problem.objective(mapped)
        if history and value <= history[-1]:
            mats = previous  # the last step's gain was within rounding: keep the point before it
            break
        if history:
            flat = flat + 1 if value - history[-1] < RELATIVE_GAIN * abs(history[-1]) else 0
        history.append(value)
        if len(history) > max_iter or flat >= PATIENCE:
            break
        for model_ops, grads in zip(ops, problem.gradients(ops, mapped)):
            model_ops["P"] = {g: assign(grad, "scipy") for g, grad in grads.items()}
        coefs = problem.line(ops)
        gamma = _best_step(coefs)
        if polynomial.polyval(gamma, coefs) <= coefs[0]:
            break  # no step towards the best vertex raises the objective: a stationary point
        previous = mats
        mats = [
            {g: (1 - gamma) * q + gamma * _vertex_of(o["P"][g], problem.device) for g, q in model.items()}
            for model, o in zip(mats, ops)
        ]
    problem.memo.clear()
    identity = {g: torch.arange(n) for g, n in problem.sizes.items()}
    perms = [identity] + [{g: assign(m, "scipy").cpu() for g, m in model.items()} for model in mats]
    objective = problem.objective(
        problem.mapped([{"P": {g: p.to(problem.device) for g, p in m.items()}} for m in perms[1:]], "P")
    )
    info = {
        "objective": objective,
        "iterations": len(history) - 1,
        "history": history,
        "seconds": time.perf_counter() - start,
    }
    return perms, info


def _vertex_of(perm: Tensor, device: torch.device) -> Tensor:
    """The permutation matrix P with P[i, perm[i]] = 1 (P·W picks row perm[i] for row i)."""
    mat = torch.zeros(len(perm), len(perm), dtype=torch.float64, device=device)
    mat[torch.arange(len(perm)), perm.to(device)] = 1.0
    return mat


def between(universe_i: Tensor, universe_j: Tensor) -> Tensor:
    """The permutation carrying model j into model i's basis through the universe (P_iᵀ P_j as an index vector):
    unit a of model i sits at universe unit u_i⁻¹[a], which holds model j's unit u_j[u_i⁻¹[a]]."""
    return universe_j[torch.argsort(universe_i)]


@dataclasses.dataclass
class C2M3Params:
    max_iter: int = 200  # Frank–Wolfe iterations at most (the reference's setting)

    def check(self) -> None:
        if self.max_iter < 1:
            raise ConfigError(f"max_iter={self.max_iter} must be >= 1")


@ALIGNERS.register("c2m3", C2M3Params, label="C2M3", abbrev="C2M3")
def align_c2m3(params: C2M3Params, models: list[nn.Module], ctx: MergeContext) -> Alignment:
    """Match all models cycle-consistently (data-free) and carry each into model 0's basis through the universe."""
    start = time.perf_counter()
    universe, info = universe_matching(ctx.spec, [parameters(m) for m in models], max_iter=params.max_iter)
    transforms: list[dict[str, Transform]] = [{}]
    for k in range(1, len(models)):
        transforms.append({g: Transform.permutation(between(universe[0][g], universe[k][g])) for g in universe[k]})
    return Alignment(transforms, {**info, "seconds": time.perf_counter() - start})


align_c2m3.keeps_first = True  # type: ignore[attr-defined]  # model 0 is the basis every model is carried into
