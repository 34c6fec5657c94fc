"""Two small models trained on disjoint class halves of the embedded digits, and a MergeContext over their union:
the shared setting of the merge and strategy tests (seconds on a CPU)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from mergebench.config import TrainConfig
from mergebench.context import MergeContext
from mergebench.data.datasets import load_dataset
from mergebench.data.merge_data import MergeData
from mergebench.models import MODELS, ModelInput
from mergebench.train import train_model


@dataclasses.dataclass
class DigitsPair:
    ctx: MergeContext
    models: list[nn.Module]
    build: Callable[[], nn.Module]


def digits_context(build: Callable[[], nn.Module], *, val_fraction: float = 0.1, batch_size: int = 128) -> MergeContext:
    info, train, test = load_dataset("digits", "unused")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    n_val = int(len(perm) * val_fraction)
    return MergeContext(
        spec=build().permutation_spec(),
        build_model=build,
        train=train,
        test=test,
        info=info,
        merge=MergeData(fit=perm[n_val:].sort().values, val=perm[:n_val].sort().values),
        batch_size=batch_size,
        eval_batch_size=1000,
        device=torch.device("cpu"),
        seed=0,
    )


def digits_models(
    num_models: int = 2, *, hidden: tuple[int, ...] = (64, 64), norm: str = "none", epochs: int = 30
) -> DigitsPair:
    """`num_models` MLPs, model k trained on its share of the classes (model 0: the first ones) with seed k."""

    def build() -> nn.Module:
        params = MODELS.get("mlp").params(hidden=list(hidden), norm=norm)
        return MODELS.get("mlp").factory(params, ModelInput(1, 8, 10))

    ctx = digits_context(build)
    groups = torch.arange(10).chunk(num_models)
    recipe = TrainConfig(
        epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant"
    )
    models = []
    for k, classes in enumerate(groups):
        torch.manual_seed(k)
        model = build()
        indices = torch.nonzero(torch.isin(ctx.train.y, classes)).flatten()
        train_model(model, ctx.train, indices, ctx.info, recipe, augment=False, seed=k, label=f"model {k}")
        models.append(model.eval())
    return DigitsPair(ctx, models, build)
