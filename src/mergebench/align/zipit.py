"""ZipIt! (Stoica et al., ICLR 2024): merge K models feature by feature, within a model as well as across models.

Per permutation group, the K models' units are stacked (K·n features) and their Pearson correlations come from one
streamed pass of all K models over the merge data. Greedily, the most correlated pair of features (or of features
merged already) is merged until n remain. A merged feature's similarity to every other is the minimum of its two
parts', times α, so long chains of merges are held back; a merge that joins two units of one model
("within-model") spends that model's budget of β × (merges per model). The reference code's rule, except that a
merged feature remembers every model it holds (the reference keeps one "origin" per feature) and β = 0 forbids
within-model merges outright (the reference allows one).

A group's result is a merge matrix M (n × K·n, each row the mean of its features) and unmerge matrices U_k (n × n,
0/1: the merged feature each of model k's units reads). Model k is carried by the dense Transform with matrix
K·M_k and inverse U_k, so the plain mean of the carried models is exactly ZipIt!'s merge (M on every output axis,
U on every input axis, the classifier averaged): `agg=avg` merges as the paper does and other aggregators weigh
the carried models. Where every merged feature holds one unit of each model (K = 2, no within-model merge),
K·M_k and U_k are a permutation and its inverse.
Dense maps carry BatchNorm statistics only approximately (see `apply_transforms`); ZipIt!'s code recomputes them
(repair=reset_bn, as the `method=zipit` preset does).

Partial zipping (`stop_at=<group>`) cuts the network after that group's units: the groups computed before the cut
are zipped, the rest stay each model's own. The final model is a `ZippedModel`: the merged network up to the cut
(the shared trunk), then every model's remaining layers (its head) reading the trunk's merged units through U_k;
its output is the mean of the heads' logits. The cut must be a bottleneck (no later layer reads anything from
before it but its units — a residual block's inner units are not); the error for another name lists the groups
that are.

α and β are chosen on the selection data (select_on) as CCA's γ is: each (α, β) of the grids gives a merge (equal
merges are scored once), judged by accuracy, then loss, after a BatchNorm reset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench.align.activations import stacked_moments
from mergebench.align.registry import ALIGNERS, Alignment
from mergebench.checkpoints import load_state
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.evaluate import evaluate_batches, selection_key
from mergebench.modes import evaluating, forward_hooks
from mergebench.registry import Component
from mergebench.spec import PermutationSpec, Transform, apply_transforms, probe_module
from mergebench.weights import mean_model


@dataclasses.dataclass
class ZipItParams:
    alpha: float | None = None
    beta: float | None = None
    alpha_grid: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 1.0])
    beta_grid: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.125, 0.25, 0.5])
    stop_at: str | None = None
    batch_size: int | None = None

    def check(self) -> None:
        if self.alpha is not None and not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha} must be in (0, 1], or null (search alpha_grid)")
        if self.beta is not None and not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta={self.beta} must be in [0, 1], or null (search beta_grid)")
        if not self.alpha_grid or not all(0.0 < a <= 1.0 for a in self.alpha_grid):
            raise ConfigError(f"alpha_grid={self.alpha_grid} must be a non-empty list of values in (0, 1]")
        if not self.beta_grid or not all(0.0 <= b <= 1.0 for b in self.beta_grid):
            raise ConfigError(f"beta_grid={self.beta_grid} must be a non-empty list of values in [0, 1]")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive integer or null (eval batch size)")

    def check_run(self, chosen: Mapping[str, Component]) -> None:
        """A partial zip leaves one head per model, which a strategy merging merged models again cannot take."""
        if self.stop_at is not None and chosen["strategy"].name == "pairwise":
            raise ConfigError(
                "align.stop_at (partial zipping) leaves one head per model, which strategy=pairwise cannot merge "
                "again: use strategy=all_to_one"
            )

    def label_suffix(self) -> str:
        """A partial zip is its own method."""
        return "" if self.stop_at is None else f" (stop_at={self.stop_at})"

    @staticmethod
    def smoke(values: dict[str, Any]) -> dict[str, Any]:
        """smoke=true: the search tries every other value of each grid."""
        return {k: v[::2] if k in ("alpha_grid", "beta_grid") else v for k, v in values.items()}


# ---------------------------------------------------------------------------------------------- statistics


# ---------------------------------------------------------------------------------------------- matching


@dataclasses.dataclass(frozen=True)
class Zip:
    """One group's zip: `assign[u]` is the merged feature that stacked unit u (model u // n, unit u % n) joins;
    the similarity of each merge made, how many joined two units of one model, and how many had to overrun a
    budget because every remaining pair would (possible with K ≥ 3 and small β)."""

    assign: Tensor
    num_models: int
    values: list[float]
    within: int
    forced: int

    def transforms(self) -> list[Transform]:
        """Model k's dense map: matrix K·M_k (rows average the merged features), inverse U_k (its 0/1 unmerge)."""
        width = self.assign.numel() // self.num_models
        unmerge = F.one_hot(self.assign, width).double()
        merge = (unmerge / unmerge.sum(dim=0)).T
        blocks = [slice(k * width, (k + 1) * width) for k in range(self.num_models)]
        return [Transform.dense(self.num_models * merge[:, b], unmerge[b]) for b in blocks]


def zip_features(corr: Tensor, num_models: int, alpha: float, beta: float) -> Zip:
    """ZipIt!'s greedy matching of the K·n stacked features of one group down to n (see the module docstring).

    Each row's best partner is cached, so a merge costs the rows it touches rather than a scan of all K²n² pairs.
    Features are indexed by their smallest stacked unit, so merged features come out ordered by it: where model 0
    takes part in every merge, the merge is in model 0's order."""
    total = corr.shape[0]
    width = total // num_models
    members = F.one_hot(torch.arange(total, device=corr.device) // width, num_models).bool()  # feature -> models
    assign = torch.arange(total, device=corr.device)
    alive = torch.ones(total, dtype=torch.bool, device=corr.device)
    budget = [int((total - width) // num_models * beta + 1e-4)] * num_models
    raw = corr.double().clone()
    raw.fill_diagonal_(-math.inf)
    sims = raw.clone()  # raw with the pairs that would overrun a budget at -inf
    for k in range(num_models):
        if budget[k] <= 0:
            _block(sims, members[:, k])
    best, partner = sims.max(dim=1)
    values: list[float] = []
    within = forced = 0
    for _ in range(total - width):
        i = int(best.argmax())
        j = int(partner[i])
        if best[i].item() == -math.inf:  # every remaining pair would overrun a budget: take the best regardless
            i, j = divmod(int(raw.view(-1).argmax()), total)
            forced += 1
        i, j = min(i, j), max(i, j)
        values.append(raw[i, j].item())
        shared = (members[i] & members[j]).nonzero().flatten().tolist()
        within += bool(shared)
        for k in shared:
            budget[k] -= 1
        members[i] |= members[j]
        members[j] = False
        alive[j] = False
        assign[assign == j] = i
        for matrix in (raw, sims):  # a merged feature inherits its parts' blocked pairs through the minimum
            row = alpha * torch.minimum(matrix[i], matrix[j])
            matrix[i], matrix[:, i] = row, row
            matrix[j], matrix[:, j] = -math.inf, -math.inf
        stale = (partner == i) | (partner == j)
        stale[[i, j]] = True
        for k in shared:
            if budget[k] == 0:  # just exhausted
                _block(sims, members[:, k])
                stale |= members[:, k]
        gained = sims[:, i] > best
        best[gained], partner[gained] = sims[gained, i], i
        rows = stale.nonzero().flatten()
        best[rows], partner[rows] = sims[rows].max(dim=1)
    order = torch.full((total,), -1, dtype=torch.long, device=corr.device)
    order[alive] = torch.arange(width, device=corr.device)
    return Zip(order[assign].cpu(), num_models, values, within, forced)


def _block(sims: Tensor, holders: Tensor) -> None:
    """No pair of features that both hold units of one model may merge any more."""
    sims[holders[:, None] & holders[None, :]] = -math.inf


# ---------------------------------------------------------------------------------------------- partial zipping


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where partial zipping splits the network: the `call`-th output (from 0, in one forward) of module `probe`,
    and the groups whose units are all computed up to it (the zipped trunk)."""

    probe: str
    call: int
    groups: tuple[str, ...]


class _CutReached(Exception):
    """Stops the trunk's forward once the cut's output is taken."""


@contextlib.contextmanager
def _at_cut(model: nn.Module, cut: Cut, replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the cut's output of each forward (one forward per block) goes through `replace`."""
    calls = itertools.count()

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        return replace(output) if next(calls) == cut.call else None

    handle = dict(model.named_modules())[cut.probe].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _trunk_output(model: nn.Module, cut: Cut, x: Tensor) -> Tensor:
    taken: list[Tensor] = []

    def take(output: Tensor) -> Tensor:
        taken.append(output)
        raise _CutReached

    with _at_cut(model, cut, take), contextlib.suppress(_CutReached):
        model(x)
    return taken[0]


def _head_output(model: nn.Module, cut: Cut, x: Tensor, units: Tensor) -> Tensor:
    with _at_cut(model, cut, lambda output: units):
        return model(x)


class ZippedModel(nn.Module):
    """A partially zipped model: the merged network up to the cut (the shared trunk), then each carried model k
    from the cut on (its head), which reads the trunk's merged units through its unmerge U_k. The output is the
    mean of the heads' logits (one label space).

    The heads are whole carried models whose output at the cut is replaced by the trunk's, so any architecture
    works; their layers before the cut run but cannot reach the output, since the cut is a bottleneck."""

    def __init__(self, trunk: nn.Module, heads: list[nn.Module], cut: Cut) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.cut = cut

    def forward(self, x: Tensor) -> Tensor:
        units = _trunk_output(self.trunk, self.cut, x)
        return torch.stack([_head_output(head, self.cut, x, units) for head in self.heads]).mean(dim=0)


@torch.no_grad()
def find_cut(spec: PermutationSpec, model: nn.Module, x: Tensor, stop_at: str) -> Cut:
    """The cut after group `stop_at`'s units: the last output of its probes in a forward of `x` (≥ 2 samples).

    A group is a cut when the logits of a forward of other inputs, with the cut's output replaced by that of `x`,
    are those of `x`: nothing else from before it reaches the output."""
    events: list[str] = []
    modules = dict(model.named_modules())
    probed = {probe_module(p) for probes in spec.probes.values() for p in probes}
    with (
        evaluating(model),
        forward_hooks((modules[p], functools.partial(_note_call, events, p)) for p in sorted(probed)),
    ):
        logits = model(x)
    modules_of = {g: {probe_module(p) for p in probes} for g, probes in spec.probes.items()}
    fired = {g: [i for i, e in enumerate(events) if e in found] for g, found in modules_of.items()}
    last = {g: calls[-1] for g, calls in fired.items() if calls}

    def cut_after(group: str) -> Cut:
        at = last[group]
        groups = tuple(g for g in spec.groups if g in last and last[g] <= at)
        return Cut(events[at], events[:at].count(events[at]), groups)

    def is_bottleneck(cut: Cut) -> bool:
        units = _trunk_output(model, cut, x)
        replaced = _head_output(model, cut, x.roll(1, dims=0), units)
        return torch.allclose(replaced, logits, rtol=1e-4, atol=1e-5 * (1 + logits.abs().max().item()))

    with evaluating(model):
        allowed = [g for g in spec.groups if g in last and is_bottleneck(cut_after(g))]
    if stop_at not in allowed:
        raise ConfigError(
            f"align.stop_at={stop_at!r} is not a group after which the network can be cut; allowed: "
            f"{', '.join(allowed) or '(none)'}"
        )
    return cut_after(stop_at)


def _note_call(events: list[str], name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
    events.append(name)


# ---------------------------------------------------------------------------------------------- the aligner


def _merged_model(
    ctx: MergeContext, models: list[nn.Module], transforms: list[dict[str, Transform]], cut: Cut | None
) -> nn.Module:
    """The merge as a run would build it with agg=avg and a BatchNorm reset: the carried models' mean, and, when
    zipping partially, the trunk with the carried models as heads."""
    states = [apply_transforms(m.state_dict(), ctx.spec, t) for m, t in zip(models, transforms, strict=True)]
    merged = mean_model(states, ctx)
    if cut is None:
        return merged
    heads = []
    for state in states:
        head = ctx.build_model()
        load_state(head, state)
        heads.append(head)
    return ZippedModel(merged, heads, cut).eval()


def _per_model(zips: dict[str, Zip], num_models: int) -> list[dict[str, Transform]]:
    by_group = {g: z.transforms() for g, z in zips.items()}
    return [{g: maps[k] for g, maps in by_group.items()} for k in range(num_models)]


@ALIGNERS.register("zipit", ZipItParams, label="ZipIt!", abbrev="ZipIt")
def align_zipit(params: ZipItParams, models: list[nn.Module], ctx: MergeContext) -> Alignment:
    start = time.perf_counter()
    batches = ctx.fit_batches(batch_size=params.batch_size or ctx.eval_batch_size)
    cut = None
    groups = [g for g in ctx.spec.groups if g in ctx.spec.probes]
    if params.stop_at is not None:
        cut = find_cut(ctx.spec, models[0], next(iter(ctx.fit_batches(batch_size=8)))[0], params.stop_at)
        groups = list(cut.groups)
    correlations = {g: m.correlation() for g, m in stacked_moments(ctx.spec, models, batches, groups).items()}
    alphas = params.alpha_grid if params.alpha is None else [params.alpha]
    betas = params.beta_grid if params.beta is None else [params.beta]
    searched = len(alphas) * len(betas) > 1
    best: tuple[tuple[float, float], float, float, dict[str, Zip], dict[str, float]] | None = None
    seen: set[bytes] = set()
    for alpha, beta in itertools.product(alphas, betas):
        zips = {g: zip_features(c, len(models), alpha, beta) for g, c in correlations.items()}
        if not searched:
            best = (0.0, 0.0), alpha, beta, zips, {}
            break
        key = b"".join(z.assign.numpy().tobytes() for z in zips.values())
        if key in seen:  # the same merge as a candidate already scored (e.g. any α when no merge is re-merged)
            continue
        seen.add(key)
        result = evaluate_batches(_merged_model(ctx, models, _per_model(zips, len(models)), cut), ctx.select_batches())
        score = selection_key(result)
        if best is None or score > best[0]:
            best = score, alpha, beta, zips, result
    assert best is not None
    _, alpha, beta, zips, result = best
    values = [v for z in zips.values() for v in z.values]
    diagnostics: dict[str, Any] = {
        "alpha": alpha,
        "beta": beta,
        "searched": searched,
        "objective": sum(values) / max(len(values), 1),  # mean similarity of the merged pairs
        "within_merges": sum(z.within for z in zips.values()),
        "forced_merges": sum(z.forced for z in zips.values()),
        "stop_at": params.stop_at,
        "zipped_groups": len(zips),
    }
    if searched:
        diagnostics.update(
            {
                "candidates": len(seen),
                "select_on": ctx.select_on,
                "select_top1": result["top1"],
                "select_loss": result["loss"],
            }
        )
    diagnostics["seconds"] = time.perf_counter() - start
    assemble = None if cut is None else functools.partial(ZippedModel, cut=cut)
    return Alignment(_per_model(zips, len(models)), diagnostics, assemble)


align_zipit.keeps_first = False  # type: ignore[attr-defined]  # every model moves into the shared basis
