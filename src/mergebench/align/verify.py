"""The permutation spec is checked on every merge, not trusted: a random permutation per group applied to model B
must leave its logits unchanged on one batch, in eval and in train mode (BatchNorm on batch statistics).

A traced or hand-written spec that misses one tensor axis (a forgotten running statistic, a shortcut on the wrong
group) gives a merge that is silently wrong; this check costs four forwards of one small batch and stops such a run
with one line naming the group. Images are cropped to SMALL_SIDE pixels where the model gives logits of the same
shape on them (fully convolutional nets with global pooling): a permutation acts on channels, never on positions, so
a spec that holds on a crop holds on the full image, and ResNet20×16 checks in a fraction of the time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mergebench.align.trace import model_spec
from mergebench.errors import ConfigError
from mergebench.spec import PermutationSpec, Transform, apply_transforms

TOLERANCE = 1e-4  # max |Δlogit| allowed, relative to the largest |logit|
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

    def diagnostics(self) -> dict[str, Any]:
        return {
            "verify_groups": self.groups,
            **{f"verify_max_diff_{mode}": diff for mode, diff in self.max_diff.items()},
            "verify_scale": self.scale,
            "verify_s": self.seconds,
        }


def _set_mode(model: nn.Module, mode: str) -> None:
    """Train mode for normalisation (batch statistics) but dropout off, so both models draw nothing at random."""
    model.train(mode == "train")
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, mode: str, state: Mapping[str, Tensor] | None = None) -> Tensor:
    """Logits as float64, of the model or of the model with the tensors of `state` in place of its own (no copy
    of a big model); the model's modes and buffers (train mode updates running statistics) are restored."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        _set_mode(model, mode)
        if state is None:
            return model(x).double()
        with _swapped(model, state):
            return model(x).double()
    finally:
        for m, training in modes.items():
            m.training = training
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


@contextlib.contextmanager
def _swapped(model: nn.Module, state: Mapping[str, Tensor]) -> Iterator[None]:
    """The model with `state`'s tensors as its parameters' and buffers' data for the duration (no copy of a big
    model; tied tensors, listed once by named_parameters, are swapped once), then its own again."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    own = [t.data for _, t in tensors]
    try:
        for name, t in tensors:
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
    time)."""
    gen = torch.Generator().manual_seed(seed)
    transforms = {}
    for group in spec.groups:
        order = torch.randperm(spec.group_size(group, state), generator=gen)
        perm = torch.empty_like(order)
        perm[order] = order.roll(-1)
        transforms[group] = Transform.permutation(perm)
    return transforms


def _permuted(model: nn.Module, spec: PermutationSpec, transforms: Mapping[str, Transform]) -> dict[str, Tensor]:
    return apply_transforms(model.state_dict(), spec, transforms)


def _diff(a: Tensor, b: Tensor) -> float:
    d = (a - b).abs().max().item()
    return float("inf") if d != d else d  # NaN counts as a mismatch


def verify_spec(
    model: nn.Module, spec: PermutationSpec, x: Tensor, *, seed: int = 0, tolerance: float = TOLERANCE
) -> Verification:
    """Check that a seeded random permutation of every group keeps `model`'s logits on `x` (eval and train mode);
    raise SpecMismatchError naming the first group that alone breaks them."""
    start = time.perf_counter()
    transforms = moving_permutations(spec, model.state_dict(), seed)
    permuted = _permuted(model, spec, transforms)
    max_diff: dict[str, float] = {}
    scale = 0.0
    for mode in MODES:
        reference = _logits(model, x, mode)
        scale = max(scale, reference.abs().max().item())
        max_diff[mode] = _diff(_logits(model, x, mode, permuted), reference)
        if max_diff[mode] > tolerance * max(reference.abs().max().item(), 1e-12):
            raise SpecMismatchError(_blame(model, spec, transforms, x, mode, reference, tolerance))
    return Verification(len(spec.groups), max_diff, scale, time.perf_counter() - start)


def _blame(
    model: nn.Module,
    spec: PermutationSpec,
    transforms: Mapping[str, Transform],
    x: Tensor,
    mode: str,
    reference: Tensor,
    tolerance: float,
) -> str:
    """The one line a failed check prints: the first group whose permutation alone changes the logits."""
    limit = tolerance * max(reference.abs().max().item(), 1e-12)
    for group in spec.groups:
        diff = _diff(_logits(model, x, mode, _permuted(model, spec, {group: transforms[group]})), reference)
        if diff > limit:
            members = spec.members(group)
            return (
                f"permutation spec check failed: permuting group {group!r} ({len(members)} tensor axes, e.g. "
                f"{members[0][0]}) changes the logits by {diff:.3g} in {mode} mode (allowed {limit:.3g}); "
                "an axis that carries this group's units is missing from the spec or is in the wrong group"
            )
    return (
        f"permutation spec check failed: permuting all groups together changes the logits in {mode} mode, "
        "though no single group does; two groups share units the spec keeps apart"
    )


def checked_spec(
    models: list[nn.Module], x: Tensor, num_classes: int | None, *, seed: int, repair: str | None = None
) -> tuple[PermutationSpec, dict[str, Any]]:
    """The run's spec (model 0's own, or traced from it), verified on model 1 (B) before anything is aligned, and
    the diagnostics to record beside the merge. Logits of the wrong width (a user model built for other data)
    stop here too, where `num_classes` is known, and REPAIR on layers whose units are not on dim 1."""
    spec, info = model_spec(models[0], x)
    shape = _output_shape(models[0], x)  # the crop, where taken, gives logits of this shape too
    x = verification_input(models[0], x, shape)
    last = info.get("spec_channels_last")
    if repair == "repair" and last:
        shown = ", ".join(last[:3]) + (f" and {len(last) - 3} more" if len(last) > 3 else "")
        raise ConfigError(
            f"repair=repair corrects conv/linear outputs with their units on dim 1, but {shown} put them last "
            "(channels-last): use repair=reset_bn or repair=none for this model"
        )
    width = (shape if shape is not None else _logits(models[0], x, "eval").shape)[-1]
    if num_classes is not None and width != num_classes:
        raise ConfigError(f"the model outputs {width} logits but the dataset has {num_classes} classes")
    checked = verify_spec(models[1], spec, x, seed=seed).diagnostics()
    return spec, {**info, **checked, "verify_input": list(x.shape)}
