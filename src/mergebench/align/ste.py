"""Git Re-Basin's straight-through estimator (Yamada et al.'s "STE"): learn the permutation through a free
copy θ̃ of model A.

Every step weight-matches B onto θ̃ (warm-started from the previous permutation), then descends the
cross-entropy of the midpoint 0.5·θ_A + 0.5·(sg(π(θ_B)) + θ̃ − sg(θ̃)) on the merge data: the forward pass sees
the merge of A with the permuted B, the gradient flows into θ̃, which steers the next matching. After every
epoch the merge of A with the current π(θ_B) is scored on held-out merge data; the best permutation wins
(`keep=held_out`). `keep=train_batch` keeps instead the permutation of the step with the lowest training-batch loss,
as YM's code does (it holds no data out).
The optimiser is SGD with momentum; weight decay and a multi-step schedule (YM's STE runs: weight decay 1e-4, and
on a coreset the lr divided by 10 at 50% and 75% of the epochs) are options.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mergebench.align.registry import ALIGNERS, PairAlignment, pairwise_aligner
from mergebench.align.weight_matching import weight_matching
from mergebench.context import MergeContext
from mergebench.errors import ConfigError
from mergebench.evaluate import evaluate_batches
from mergebench.progress import EpochProgress
from mergebench.seeds import mix_seeds
from mergebench.spec import Transform, apply_transforms
from mergebench.weights import mean_model

SCHEDULES = ("constant", "multi_step")
KEEPS = ("held_out", "train_batch")
MILESTONES = (0.5, 0.75)  # multi_step: fractions of the epochs after which the lr is divided by 10 (YM's STE code)


@dataclasses.dataclass
class STEParams:
    epochs: int = 10
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    keep: str = "held_out"  # which permutation wins: lowest held-out loss after an epoch | lowest training-batch loss
    batch_size: int | None = None
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not known; allowed: {', '.join(SCHEDULES)}")
        if self.keep not in KEEPS:
            raise ConfigError(f"keep={self.keep!r} is not known; allowed: {', '.join(KEEPS)}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive integer or null (the recipe's)")


def epoch_lr(params: STEParams, epoch: int) -> float:
    """The lr of 1-based `epoch`: multi_step divides it by 10 once epoch int(f·epochs) is over, for each f in
    MILESTONES (epochs 1-500 of 1000 at lr, 501-750 at lr/10, then lr/100), as YM's per-epoch MultiStepLR does."""
    if params.schedule == "constant":
        return params.lr
    passed = sum(int(f * params.epochs) < epoch for f in MILESTONES)
    return params.lr * 0.1**passed


def _as_transforms(perms: dict[str, Tensor]) -> dict[str, Transform]:
    return {g: Transform.permutation(p) for g, p in perms.items()}


def _straight_through_midpoint(
    state_a: dict[str, Tensor], aligned_b: dict[str, Tensor], free: dict[str, Tensor]
) -> dict[str, Tensor]:
    """0.5·θ_A + 0.5·(sg(π(θ_B)) + θ̃ − sg(θ̃)) for parameters: the value of the merge with π(θ_B), the gradient
    of θ̃. Buffers are plain averages (BatchNorm in train mode normalises with batch statistics anyway)."""
    out = {}
    for k, a in state_a.items():
        if k in free:
            out[k] = 0.5 * a + 0.5 * (aligned_b[k] + free[k] - free[k].detach())
        elif a.is_floating_point():
            out[k] = 0.5 * (a + aligned_b[k])
        else:
            out[k] = a.clone()
    return out


@ALIGNERS.register("ste", STEParams, label="STE", abbrev="STE")
@pairwise_aligner
def align_ste(params: STEParams, ref: nn.Module, other: nn.Module, ctx: MergeContext) -> PairAlignment:
    start = time.perf_counter()
    seed = mix_seeds(ctx.seed, params.seed)
    state_a = {k: v.detach() for k, v in ref.state_dict().items()}
    state_b = {k: v.detach() for k, v in other.state_dict().items()}
    param_names = [name for name, _ in ref.named_parameters()]
    free = {k: state_a[k].clone().requires_grad_(True) for k in param_names}  # θ̃, initialised at θ_A
    params_b = {k: state_b[k] for k in param_names}
    optimizer = torch.optim.SGD(free.values(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    net = ctx.build_model().train()  # structure only: functional_call supplies every tensor

    def match(perms: dict[str, Tensor] | None, step: int) -> dict[str, Tensor]:
        """Weight-match B onto θ̃ to convergence over the parameters (DESIGN §5.1: running statistics are permuted
        with their group but not scored), warm-started from the previous step's permutation; step 0 starts as
        align=weight_matching with the same seed would."""
        theta = {k: v.detach() for k, v in free.items()}
        step_seed = seed if perms is None else mix_seeds(seed, step)
        return weight_matching(ctx.spec, theta, params_b, seed=step_seed, init=perms)[0]

    def held_out_loss(perms: dict[str, Tensor]) -> float:
        aligned = apply_transforms(state_b, ctx.spec, _as_transforms(perms))
        return evaluate_batches(mean_model([state_a, aligned], ctx), ctx.select_batches())["loss"]

    perms, step = match(None, 0), 0
    held_out = params.keep == "held_out"
    initial_loss = held_out_loss(perms) if held_out else None
    best_loss, best_perms, best_epoch = initial_loss if held_out else float("inf"), perms, 0
    batches = ctx.fit_batches(shuffle=True, seed=seed, batch_size=params.batch_size or ctx.batch_size)
    with EpochProgress("STE", params.epochs, len(batches)) as progress:
        for epoch in range(1, params.epochs + 1):
            lr = epoch_lr(params, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for x, y in batches:
                step += 1
                perms = match(perms, step)
                aligned = apply_transforms(state_b, ctx.spec, _as_transforms(perms))
                mixed = _straight_through_midpoint(state_a, aligned, free)
                loss = F.cross_entropy(functional_call(net, mixed, (x,)), y)
                if not held_out and loss.item() < best_loss:  # the merge with `perms`, before this step's update
                    best_loss, best_perms, best_epoch = loss.item(), perms, epoch
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.step(len(y))
            step += 1
            perms = match(perms, step)
            if not held_out:
                progress.epoch_end(epoch, loss.item(), lr)
                continue
            val_loss = held_out_loss(perms)
            if val_loss < best_loss:
                best_loss, best_perms, best_epoch = val_loss, perms, epoch
            progress.epoch_end(epoch, loss.item(), lr, extra=f"held-out {val_loss:.3f}")
    with torch.no_grad():  # how far θ̃ moved from θ_A: what the lr, momentum and weight decay did
        shift = torch.linalg.vector_norm(torch.cat([(free[k] - state_a[k]).flatten() for k in param_names]))
        scale = torch.linalg.vector_norm(torch.cat([state_a[k].flatten() for k in param_names]))
    diagnostics = {
        "epochs": params.epochs,
        "final_lr": optimizer.param_groups[0]["lr"],
        "free_shift": float(shift / scale),
        "keep": params.keep,
        "best_epoch": best_epoch,
        "held_out_loss" if held_out else "train_batch_loss": best_loss,
        "wm_held_out_loss": initial_loss,
        "seconds": time.perf_counter() - start,
    }
    return PairAlignment(_as_transforms(best_perms), diagnostics)
