"""Base-model training (the CCA Merge / NP recipes) behind a content-hash cache."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergebench.cache import ModelCache, content_key, tensor_digest
from mergebench.config import TrainConfig
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.loader import Batches
from mergebench.progress import console, progress_bar

TRAINER_VERSION = 1


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (mixed precision per the recipe); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(recipe: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup_epochs`, then linear decay to 0, stepped per batch."""
    total = max(1, recipe.epochs * steps_per_epoch)
    warm = int(recipe.warmup_epochs * steps_per_epoch)
    if recipe.schedule == "constant":
        return lambda step: 1.0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


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
) -> dict[str, float]:
    """Train in place on `indices` of the on-device `data`; returns loss, throughput and wall time."""
    device = data.x.device
    batches = Batches(data, indices, info, recipe.batch_size, shuffle=True, augment=augment, seed=seed)
    if device.type == "cuda" and recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_fn = torch.compile(model) if recipe.compile else model
    optimizer = make_optimizer(model.parameters(), recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, len(batches)))
    model.train()
    start, seen, loss_value = time.perf_counter(), 0, float("nan")
    with progress_bar() as progress:
        task = progress.add_task(label, total=recipe.epochs * len(batches), status=f"epoch 1/{recipe.epochs}")
        for epoch in range(recipe.epochs):
            total_loss, count = torch.zeros((), device=device), 0
            for x, y in batches:
                if device.type == "cuda" and recipe.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, recipe.amp):
                    loss = F.cross_entropy(step_fn(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.detach() * y.numel()
                count += y.numel()
                progress.advance(task)
            seen += count
            loss_value = (total_loss / max(1, count)).item()
            rate = seen / (time.perf_counter() - start)
            progress.update(
                task,
                status=f"epoch {epoch + 1}/{recipe.epochs} loss {loss_value:.3f} "
                f"lr {scheduler.get_last_lr()[0]:.2g} {rate:,.0f} img/s",
            )
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

    def key(self) -> str:
        recipe = {k: v for k, v in dataclasses.asdict(self.recipe).items() if k not in ("only", "compile")}
        return content_key(
            {
                "data": tensor_digest(self.data.x[self.indices.to(self.data.x.device)], self.data.y[self.indices]),
                "dataset": dataclasses.asdict(self.info),
                "model": self.model_name,
                "model_params": dataclasses.asdict(self.model_params),
                "recipe": recipe,
                "augment": self.augment,
                "init_seed": self.init_seed,
                "trainer_version": TRAINER_VERSION,
            }
        )


def train_or_load(
    request: BaseModelRequest, build: Callable[[], nn.Module], cache: ModelCache
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the base model from the cache, or train it (once, even across concurrent jobs) and cache it."""
    key = request.key()

    def create() -> tuple[dict[str, Tensor], dict[str, Any]]:
        torch.manual_seed(request.init_seed)
        model = build()
        stats = train_model(
            model,
            request.data,
            request.indices,
            request.info,
            request.recipe,
            augment=request.augment,
            seed=request.init_seed,
            label=request.label,
        )
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        return state, {"label": request.label, "key": key, **stats}

    state, meta, hit = cache.get_or_create(key, create)
    model = build()
    model.load_state_dict(state)
    verb = "cache hit" if hit else f"trained in {meta.get('wall_s', 0):.1f}s"
    console.log(f"{request.label}: {verb} ({key})")
    return model.eval(), {**meta, "cache_hit": hit}
