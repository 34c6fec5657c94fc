"""The permutation spec is checked on every merge, not trusted: a random permutation per group applied to model B
must leave its logits unchanged on one batch, in eval and in train mode (BatchNorm on batch statistics).

A traced or hand-written spec that misses one tensor axis (a forgotten running statistic, a shortcut on the wrong
group) gives a merge that is silently wrong; this check costs four forwards of one small batch and stops such a run
with one line naming the group. Images are cropped to SMALL_SIDE pixels where the model gives logits of the same
shape on them (fully convolutional nets with global pooling): a permutation acts on channels, never on positions, so
a spec that holds on a crop holds on the full image, and ResNet20×16 checks in a fraction of the time.

The check must never refuse a correct spec, so nothing but the spec may move the logits: a difference above the
float32 bound is decided on a float64 copy of the model (in float32, BatchNorm's batch statistics over the few
values an ImageNet net keeps at 1×1 magnify rounding to a visible difference); every module whose train-mode
forward draws random numbers (dropout, stochastic depth, drop path, whatever the model calls them) is found by
running it and kept in eval mode; non-persistent buffers (in no state dict) are left as they are.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from mergebench.errors import ConfigError
from mergebench.modes import restored_modes
from mergebench.spec import PermutationSpec, Transform, apply_transforms
from mergebench.spec.heads import draw_permutations
from mergebench.spec.trace import model_spec

# max |Δlogit| allowed, relative to the largest |logit|: float64 rounding through a deep net stays below 1e-12, an
# axis on the wrong group moves logits by 1e-3 and more
TOLERANCE = 1e-8
# where a model cannot run in float64 (an op without a float64 kernel), the float32 check's bound
FLOAT32_TOLERANCE = 1e-4
ROUNDING_MARGIN = 100
MODES = ("eval", "train")
# samples the check runs on: batch statistics need two, and every sample costs four forwards (a 32×32 image through
# ResNet20×16 is ~0.3 s on one CPU thread), so a few: a misplaced unit shows in every sample where it is active
VERIFY_BATCH = 4
SMALL_SIDE = 8  # ResNet20's last stage still has 2×2 positions for BatchNorm's batch statistics


class SpecMismatchError(ConfigError):
    """Permuting model B by its spec changed its function: the spec is wrong for this architecture."""


@dataclasses.dataclass(frozen=True)
class Verification:
    groups: int
    max_diff: dict[str, float]
    scale: float
    seconds: float
    dtype: str = "float32"
    random_off: tuple[str, ...] = ()
    rounding: dict[str, float] = dataclasses.field(default_factory=dict)

    def diagnostics(self) -> dict[str, Any]:
        return {
            **self.rounding,
            "verify_groups": self.groups,
            **{f"verify_max_diff_{mode}": diff for mode, diff in self.max_diff.items()},
            "verify_scale": self.scale,
            "verify_s": self.seconds,
            "verify_dtype": self.dtype,
            "verify_random_off": list(self.random_off),
        }


@dataclasses.dataclass
class CheckModel:
    """The model the check runs (model B itself, or its float64 copy) and the names of its modules whose
    train-mode randomness is switched off."""

    model: nn.Module
    x: Tensor
    tolerance: float
    random_off: tuple[str, ...] = ()
    # per mode, an absolute bound below which a difference is rounding (measured, for the float64 copy)
    floor: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def dtype(self) -> str:
        return str(self.x.dtype).removeprefix("torch.")

    references: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # the model's own logits, per mode

    def logits(self, mode: str, state: Mapping[str, Tensor] | None = None) -> Tensor:
        """The logits with the tensors of `state` in place, or the model's own (computed once per mode)."""
        if state is not None:
            return _logits(self.model, self.x, mode, state, self.random_off)
        if mode not in self.references:
            self.references[mode] = _logits(self.model, self.x, mode, None, self.random_off)
        return self.references[mode]


def float64_copy(model: nn.Module, x: Tensor, random_off: tuple[str, ...]) -> CheckModel | None:
    """A float64 copy of `model` (the user's model is never touched); None where a float64 forward fails (an op
    without a float64 kernel)."""
    copied = copy.deepcopy(model).to(torch.float64)
    cx = x.to(torch.float64) if x.is_floating_point() else x
    try:
        _logits(copied, cx, "eval")
    except RuntimeError:
        return None
    return CheckModel(copied, cx, TOLERANCE, random_off)


def switch_off_randomness(model: nn.Module, x: Tensor) -> tuple[str, ...]:
    """The names of the modules to keep in eval mode because their train-mode output changes with the random seed
    (dropout, stochastic depth, drop path, a user's noise layer). Dropout layers are known; anything else is found
    by running the model under two seeds, then its modules deepest first, so a block is switched off whole only
    when its randomness is its own (a functional drop path in its forward); its BatchNorm layers then stay on batch
    statistics. Randomness drawn per sample that this misses by chance (a rarely dropped path) is harmless: every
    forward of the check starts from the same seed, so the original and the permuted model draw the same samples."""
    probe = x[:2]  # two samples: batch statistics still exist, element-wise noise shows in any batch
    known = tuple(name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd))
    with _restored(model):
        _set_mode(model, "train", known)
        if not _random(model, (probe,), {}):
            return known
        inputs: dict[str, tuple[tuple, dict]] = {}
        names = {m: name for name, m in model.named_modules()}

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs.setdefault(names[module], (args, kwargs))

        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
        try:
            with _restored(model), torch.no_grad():
                model(probe)
        finally:
            for handle in handles:
                handle.remove()
        modules, off = dict(model.named_modules()), list(known)
        for name in sorted(inputs, key=lambda n: -n.count(".") - (n != "")):
            if modules[name].training and _random(modules[name], *inputs[name]):
                off.append(name)
                _set_mode(model, "train", tuple(off))
                if not _random(model, (probe,), {}):
                    break
        return tuple(off)


def _random(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether two forwards under different seeds disagree (buffers restored after each)."""
    outputs = []
    first = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)), torch.empty(0))
    for seed in (0, 1):
        with _seeded(seed, first), _restored(module), torch.no_grad():
            outputs.append([t for t in tree_leaves(module(*args, **kwargs)) if isinstance(t, Tensor)])
    return any(not torch.equal(a, b) for a, b in zip(*outputs))


def _set_mode(model: nn.Module, mode: str, off: tuple[str, ...] = ()) -> None:
    """Eval mode, or train mode (normalisation on batch statistics) with the modules named in `off` in eval mode
    but their BatchNorm layers still on batch statistics."""
    model.train(mode == "train")
    if mode != "train":
        return
    modules = dict(model.named_modules())
    for name in off:
        modules[name].eval()
        for inner in modules[name].modules():
            if isinstance(inner, nn.modules.batchnorm._NormBase):
                inner.train()


@contextlib.contextmanager
def _seeded(seed: int, like: Tensor) -> Iterator[None]:
    """The global generators of the CPU and of `like`'s device seeded for the duration, then as they were."""
    with torch.random.fork_rng(devices=[like.device] if like.is_cuda else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """The model's modes and buffers (train mode updates running statistics) as they were, afterwards."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with restored_modes(model):
            yield
    finally:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


@torch.no_grad()
def _logits(
    model: nn.Module, x: Tensor, mode: str, state: Mapping[str, Tensor] | None = None, off: tuple[str, ...] = ()
) -> Tensor:
    """Logits as float64, of the model or of the model with the tensors of `state` in place of its own (no copy
    of a big model); the model's modes and buffers are restored."""
    with _restored(model), _seeded(0, x):  # randomness left draws the same in the original and the permuted model
        _set_mode(model, mode, off)
        if state is None:
            return model(x).double()
        with _swapped(model, state):
            return model(x).double()


@contextlib.contextmanager
def _swapped(model: nn.Module, state: Mapping[str, Tensor]) -> Iterator[None]:
    """The model with `state`'s tensors as its parameters' and buffers' data for the duration (no copy of a big
    model; tied tensors, listed once by named_parameters, are swapped once), then its own again. Non-persistent
    buffers (an index table, not in any state dict) keep their own data."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    own = [t.data for _, t in tensors]
    try:
        for name, t in tensors:
            if name in state:
                t.data = state[name]
        yield
    finally:
        for (_, t), data in zip(tensors, own):
            t.data = data


def _output_shape(model: nn.Module, x: Tensor) -> tuple[int, ...] | None:
    """The logits' shape on `x` from meta tensors (no arithmetic); None where an op has no meta kernel."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    try:
        with torch.no_grad():
            out = functional_call(model, {k: v.to("meta") for k, v in tensors.items()}, (x.to("meta"),))
    except Exception:
        return None
    return tuple(out.shape) if isinstance(out, Tensor) else None


def verification_input(model: nn.Module, x: Tensor, full: tuple[int, ...] | None = None) -> Tensor:
    """`x`, or its central SMALL_SIDE×SMALL_SIDE crop where the model takes it and gives logits of the same shape
    (a flatten into a fixed-size Linear or a positional embedding does not: those models keep the full size).
    `full`: the logits' shape on `x`, where the caller has it already."""
    if x.dim() != 4 or min(x.shape[2:]) <= SMALL_SIDE:
        return x
    top, left = (x.shape[2] - SMALL_SIDE) // 2, (x.shape[3] - SMALL_SIDE) // 2
    crop = x[:, :, top : top + SMALL_SIDE, left : left + SMALL_SIDE].contiguous()
    full = _output_shape(model, x) if full is None else full
    if full is None or _output_shape(model, crop) != full:
        return x
    return crop


def moving_permutations(spec: PermutationSpec, state: Mapping[str, Tensor], seed: int) -> dict[str, Transform]:
    """A random permutation per group that moves every unit (one cycle through a random order), so no unit of a
    misassigned axis can stay in place by chance (a plain random permutation of 2 units is the identity half the
    time). Head groups move by whole heads (σ one cycle through the heads) and within every head (one cycle each).
    """
    gen = torch.Generator().manual_seed(seed)

    def cycle(n: int) -> Tensor:
        order = torch.randperm(n, generator=gen)
        perm = torch.empty_like(order)
        perm[order] = order.roll(-1)
        return perm

    sizes = {g: spec.group_size(g, state) for g in spec.groups}
    return {g: Transform.permutation(p) for g, p in draw_permutations(spec, sizes, cycle).items()}


def _permuted(model: nn.Module, spec: PermutationSpec, transforms: Mapping[str, Transform]) -> dict[str, Tensor]:
    return apply_transforms(model.state_dict(), spec, transforms)


def _diff(a: Tensor, b: Tensor) -> float:
    d = (a - b).abs().max().item()
    return float("inf") if d != d else d  # NaN counts as a mismatch


def verify_spec(
    model: nn.Module, spec: PermutationSpec, x: Tensor, *, seed: int = 0, tolerance: float | None = None
) -> Verification:
    """Check that a seeded random permutation of every group keeps `model`'s logits on `x` (eval and train mode,
    train-time randomness off); raise SpecMismatchError naming the first group that alone breaks them.

    The model is checked as it is (float32, FLOAT32_TOLERANCE) and, only where that fails, again on a float64 copy
    (TOLERANCE): rounding passes there, a wrong spec fails there too. `tolerance` replaces both bounds."""
    start = time.perf_counter()
    check = CheckModel(model, x, FLOAT32_TOLERANCE, switch_off_randomness(model, x))
    if x.dtype == torch.float64 or not x.is_floating_point():
        check.tolerance = TOLERANCE
    transforms = moving_permutations(spec, model.state_dict(), seed)
    outcome = _compare(check, spec, transforms, tolerance)
    rounding = {}
    if isinstance(outcome, Failure) and check.dtype != "float64":
        exact = float64_copy(model, x, check.random_off)
        if exact is not None:  # the modes float32 passed stand; the float64 copy decides the others
            rest = MODES[MODES.index(outcome.mode) :]
            passed, passed_scale = outcome.passed, outcome.scale
            rounding = {f"verify_float32_diff_{outcome.mode}": outcome.diff}
            # float64 rounds 2^29 times finer than float32: the float32 difference so scaled (with a margin of
            # 100) bounds what rounding can leave in float64, where a wrong axis still moves logits by ~1e-3; where
            # float32 is saturated (its difference as large as the logits), the float64 copy's own sensitivity to
            # rounding-sized changes of its weights is measured instead
            exact.floor = {mode: ROUNDING_MARGIN * d for mode, d in rounding_sensitivity(exact, seed, rest).items()}
            scaled = outcome.diff * torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
            exact.floor[outcome.mode] = max(exact.floor[outcome.mode], ROUNDING_MARGIN * scaled)
            rounding |= {f"verify_float64_floor_{mode}": floor for mode, floor in exact.floor.items()}
            check, outcome = exact, _compare(exact, spec, transforms, tolerance, rest)
            if not isinstance(outcome, Failure):
                outcome = {**passed, **outcome[0]}, max(passed_scale, outcome[1])
    if isinstance(outcome, Failure):
        raise SpecMismatchError(_blame(check, spec, transforms, outcome, model, x))
    max_diff, scale = outcome
    seconds = time.perf_counter() - start
    return Verification(len(spec.groups), max_diff, scale, seconds, check.dtype, check.random_off, rounding)


NUDGE = 1e-12  # relative change of the inputs that measures the float64 copy's sensitivity (linear at this size)


def rounding_sensitivity(check: CheckModel, seed: int, modes: Sequence[str] = MODES) -> dict[str, float]:
    """How far float64 rounding can move the copy's logits, per mode: the change when the inputs move by a seeded
    relative NUDGE (every layer's rounding passes through the layers after it, as the inputs' change does),
    scaled down to float64's rounding unit. BatchNorm's batch statistics over a few values (an ImageNet net at 1×1)
    can amplify rounding a billion-fold in train mode. Integer inputs (token ids) nudge the weights instead."""
    gen = torch.Generator().manual_seed(seed)

    def nudge(t: Tensor) -> Tensor:
        return t * (1 + NUDGE * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype))

    eps = torch.finfo(torch.float64).eps
    if check.x.is_floating_point():
        nudged_x = nudge(check.x)
        changed = {m: _logits(check.model, nudged_x, m, None, check.random_off) for m in modes}
    else:
        state = {k: nudge(t) for k, t in check.model.state_dict().items() if t.is_floating_point()}
        changed = {m: check.logits(m, state) for m in modes}
    return {m: _diff(changed[m], check.logits(m)) * eps / NUDGE for m in modes}


@dataclasses.dataclass(frozen=True)
class Failure:
    mode: str
    diff: float
    limit: float
    reference: Tensor
    passed: dict[str, float]  # the modes checked before, their largest differences
    scale: float


def _compare(
    check: CheckModel,
    spec: PermutationSpec,
    transforms: Mapping[str, Transform],
    tolerance: float | None,
    modes: Sequence[str] = MODES,
) -> tuple[dict[str, float], float] | Failure:
    """The largest |Δlogit| per mode and the logits' scale, or the first mode where it exceeds the bound."""
    permuted = _permuted(check.model, spec, transforms)
    max_diff: dict[str, float] = {}
    scale = 0.0
    for mode in modes:
        reference = check.logits(mode)
        scale = max(scale, reference.abs().max().item())
        max_diff[mode] = _diff(check.logits(mode, permuted), reference)
        limit = (check.tolerance if tolerance is None else tolerance) * max(reference.abs().max().item(), 1e-12)
        limit = max(limit, check.floor.get(mode, 0.0))
        if max_diff[mode] > limit:
            passed = {m: d for m, d in max_diff.items() if m != mode}
            return Failure(mode, max_diff[mode], limit, reference, passed, scale)
    return max_diff, scale


def _blame(
    check: CheckModel,
    spec: PermutationSpec,
    transforms: Mapping[str, Transform],
    failure: Failure,
    original: nn.Module,
    x: Tensor,
) -> str:
    """The one line a failed check prints: the first group whose permutation alone changes the logits, and whether
    that is above rounding (on the float64 copy, where float32 rounding is measured too) or may be rounding (a
    model that cannot run in float64)."""
    mode, reference = failure.mode, failure.reference
    if check.dtype == "float64":
        rounding = _diff(_logits(original, x, mode, off=check.random_off), reference)
        where = f"in {mode} mode, above rounding (a float64 copy; float32 rounding alone moves them by {rounding:.2g})"
    else:
        where = f"in {mode} mode ({check.dtype}: the model does not run in float64, so this may be rounding)"
    ties = spec.ties()
    for group in spec.groups:
        tie = spec.tie_of(group)
        together = [group] if tie is None else [g for g in (tie, *ties[tie]) if g in transforms]  # heads move alike
        moved = {g: transforms[g] for g in together}
        diff = _diff(check.logits(mode, _permuted(check.model, spec, moved)), reference)
        if diff > failure.limit:
            members = spec.members(group) or [(name, axis) for name, axis, _ in spec.part_members(group)]
            rest = [repr(g) for g in together if g != group]
            tied = f" with its head tie ({', '.join(rest)})" if rest else ""
            return (
                f"permutation spec check failed: permuting group {group!r}{tied} ({len(members)} tensor axes, e.g. "
                f"{members[0][0]}) changes the logits by {diff:.3g} {where}; allowed {failure.limit:.3g}: an "
                "axis that carries this group's units is missing from the spec or is in the wrong group"
            )
    return (
        f"permutation spec check failed: permuting all groups together changes the logits by {failure.diff:.3g} "
        f"{where}, though no single group does: two groups share units the spec keeps apart"
    )


def checked_spec(
    models: list[nn.Module],
    x: Tensor,
    num_classes: int | None,
    *,
    seed: int,
    check: Callable[[dict], None] | None = None,
) -> tuple[PermutationSpec, dict[str, Any]]:
    """The run's spec (model 0's own, or traced from it), verified on model 1 (B) before anything is aligned, and
    the diagnostics to record beside the merge. Logits of the wrong width (a user model built for other data)
    stop here too, where `num_classes` is known; `check` lets the chosen methods refuse the spec first, from its
    diagnostics (REPAIR and channels-last layers: `Methods.check_spec`)."""
    spec, info = model_spec(models[0], x)
    if check is not None:
        check(info)
    shape = _output_shape(models[0], x)  # the crop, where taken, gives logits of this shape too
    x = verification_input(models[0], x, shape)
    width = (shape if shape is not None else _logits(models[0], x, "eval").shape)[-1]
    if num_classes is not None and width != num_classes:
        raise ConfigError(f"the model outputs {width} logits but the dataset has {num_classes} classes")
    checked = verify_spec(models[1], spec, x, seed=seed).diagnostics()
    return spec, {**info, **checked, "verify_input": list(x.shape)}
