"""Base-model training (the CCA Merge / NP recipes) behind a content-hash cache."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench.cache import ModelCache, content_key, tensor_digest
from mergebench.checkpoints import load_state
from mergebench.config import TrainConfig
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.loader import Batches
from mergebench.errors import ConfigError
from mergebench.pause import pause_point
from mergebench.progress import EpochProgress, announce

TRAINER_VERSION = 2  # 2: warm-up capped by warmup_max_fraction; warmup_cosine


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (mixed precision per the recipe); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def warmup_steps(recipe: TrainConfig, steps_per_epoch: int) -> int:
    """Warm-up length in batches: `warmup_epochs`, capped at `warmup_max_fraction` of the run when set, so a
    5-epoch run of a 200-epoch recipe warms up for 2.5% of it instead of ending at the peak lr."""
    epochs = recipe.warmup_epochs
    if recipe.warmup_max_fraction is not None:
        epochs = min(epochs, recipe.warmup_max_fraction * recipe.epochs)
    return int(epochs * steps_per_epoch)


def lr_factor(recipe: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each batch: `constant`, or a linear warm-up then a linear (`warmup_linear`,
    CCA Merge / NP) or cosine (`warmup_cosine`, Git Re-Basin's SGD) decay to 0."""
    if recipe.schedule == "constant":
        return lambda step: 1.0
    total = max(1, recipe.epochs * steps_per_epoch)
    warm = warmup_steps(recipe, steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total - warm))
        if recipe.schedule == "warmup_cosine":
            return 0.5 * (1.0 + math.cos(math.pi * done))
        return 1.0 - done

    return factor


class TrainingDiverged(ConfigError):
    """The loss became NaN/inf or blew up: the recipe does not train this model (and nothing is cached)."""


BLOW_UP = 1e4  # an epoch's mean loss this many times the first batch's loss counts as divergence


def check_divergence(loss: float, first: float | None, epoch: int, label: str, recipe: TrainConfig) -> None:
    if first is None or (math.isfinite(loss) and loss <= BLOW_UP * max(first, 1e-3)):
        return
    raise TrainingDiverged(
        f"training diverged: {label} epoch {epoch} has loss {loss:.3g} (first batch {first:.3g}) with "
        f"train.optimizer={recipe.optimizer} train.lr={recipe.lr:g} train.batch_size={recipe.batch_size}; "
        "lower train.lr (nothing was cached)"
    )


def make_optimizer(params: Any, recipe: TrainConfig) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(
        params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=False
    )


def train_model(
    model: nn.Module,
    data: ImageData,
    indices: Tensor,
    info: DatasetInfo,
    recipe: TrainConfig,
    *,
    augment: bool,
    seed: int,
    label: str,
    on_epoch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train in place on `indices` of the on-device `data`; returns loss, throughput and wall time. `on_epoch(e)`
    runs after epoch e (1-based), the model in training mode when it returns."""
    device = data.x.device
    batches = Batches(data, indices, info, recipe.batch_size, shuffle=True, augment=augment, seed=seed)
    if device.type == "cuda" and recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_fn = torch.compile(model) if recipe.compile else model
    optimizer = make_optimizer(model.parameters(), recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, len(batches)))
    model.train()
    start, seen, loss_value, first_loss = time.perf_counter(), 0, float("nan"), None
    with EpochProgress(label, recipe.epochs, len(batches)) as progress:
        for epoch in range(recipe.epochs):
            total_loss, count = torch.zeros((), device=device), 0
            for x, y in batches:
                if device.type == "cuda" and recipe.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, recipe.amp):
                    loss = F.cross_entropy(step_fn(x), y)
                if first_loss is None:
                    first_loss = loss.item()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.detach() * y.numel()
                count += y.numel()
                progress.step(y.numel())
            seen += count
            loss_value = (total_loss / max(1, count)).item()
            check_divergence(loss_value, first_loss, epoch + 1, label, recipe)
            progress.epoch_end(epoch + 1, loss_value, scheduler.get_last_lr()[0])
            if on_epoch is not None:
                on_epoch(epoch + 1)
                model.train()
            pause_point("train_epoch")
    wall = time.perf_counter() - start
    return {"train_loss": loss_value, "wall_s": wall, "images_per_s": seen / wall if wall > 0 else 0.0}


@dataclasses.dataclass(frozen=True)
class BaseModelRequest:
    """Everything that determines one base model; its hash is the cache key."""

    label: str
    data: ImageData
    indices: Tensor
    info: DatasetInfo
    model_name: str
    model_params: Any
    recipe: TrainConfig
    augment: bool
    init_seed: int

    @property
    def seed(self) -> int:
        """The seed that initialises and shuffles: the recipe's `init_seed` when set, else the run's (seed + k)."""
        return self.init_seed if self.recipe.init_seed is None else self.recipe.init_seed

    def key(self) -> str:
        skip = ("only", "compile", "init_seed")  # init_seed enters as the seed used, so keys without it are unchanged
        recipe = {k: v for k, v in dataclasses.asdict(self.recipe).items() if k not in skip}
        return content_key(
            {
                "data": tensor_digest(self.data.x[self.indices.to(self.data.x.device)], self.data.y[self.indices]),
                "dataset": dataclasses.asdict(self.info),
                "model": self.model_name,
                "model_params": dataclasses.asdict(self.model_params),
                "recipe": recipe,
                "augment": self.augment,
                "init_seed": self.seed,
                "trainer_version": TRAINER_VERSION,
            }
        )


def train_request(
    request: BaseModelRequest,
    build: Callable[[], nn.Module],
    on_epoch: Callable[[nn.Module, int], None] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """A model built under the request's seed and trained as the request says; `on_epoch(model, e)` after epoch e."""
    torch.manual_seed(request.seed)
    model = build()
    stats = train_model(
        model,
        request.data,
        request.indices,
        request.info,
        request.recipe,
        augment=request.augment,
        seed=request.seed,
        label=request.label,
        on_epoch=None if on_epoch is None else functools.partial(on_epoch, model),
    )
    return model, stats


def train_or_load(
    request: BaseModelRequest, build: Callable[[], nn.Module], cache: ModelCache
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the base model from the cache, or train it (once, even across concurrent jobs) and cache it."""
    key = request.key()

    def create() -> tuple[dict[str, Tensor], dict[str, Any]]:
        model, stats = train_request(request, build)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        return state, {"label": request.label, "key": key, **stats}

    state, meta, hit = cache.get_or_create(key, create)
    model = build()
    load_state(model, state)
    verb = "cache hit" if hit else f"trained in {meta.get('wall_s', 0):.1f}s"
    announce(f"{request.label}: {verb} ({key})")
    return model.eval(), {**meta, "cache_hit": hit}


def train_best_epoch(
    request: BaseModelRequest, build: Callable[[], nn.Module], score: Callable[[nn.Module], float]
) -> tuple[nn.Module, dict[str, Any]]:
    """Train as `train_or_load` would (not cached: the per-epoch scores depend on `score`) and keep the epoch with the
    highest `score(model)` (ties: the earliest). For protocols that report the best epoch, e.g. YM's Coreset AB."""
    scores: list[float] = []
    best: dict[str, Tensor] = {}

    def keep_best(model: nn.Module, epoch: int) -> None:
        model.eval()
        with torch.no_grad():
            scores.append(score(model))
        if scores[-1] > max(scores[:-1], default=-math.inf):
            best.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    model, stats = train_request(request, build, keep_best)
    if not scores:  # zero epochs: the initialisation is all there is
        return model.eval(), {**stats, "best_epoch": 0, "epoch_scores": scores}
    load_state(model, best)
    epoch = max(range(len(scores)), key=scores.__getitem__) + 1
    return model.eval(), {**stats, "best_epoch": epoch, "last_epoch_score": scores[-1], "epoch_scores": scores}
