"""The Python API: merge models already in memory, with the same aligners, aggregators and repairs as the CLI.

    merged, diagnostics = mergebench.merge([model_a, model_b], align="permute", agg="avg", repair="repair",
                                           data=(x, y))

`data` is the merge data as tensors the models take as they are (no normalisation is applied) and their labels;
the permutation spec is the models' own `permutation_spec()` or traced, and it is verified on model B before
anything is aligned, exactly as in a CLI run.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergebench.align import ALIGNERS
from mergebench.align.verify import VERIFY_BATCH, checked_spec
from mergebench.context import MergeContext
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.merge_data import MergeData
from mergebench.errors import ConfigError
from mergebench.merge import AGGREGATORS, REPAIRS, STRATEGIES
from mergebench.merge.registry import Methods
from mergebench.merge.strategies import check_combination
from mergebench.registry import Component, Registry


class TensorBatches:
    """Re-iterable seeded mini-batches of in-memory tensors (REPAIR iterates its batches several times)."""

    def __init__(self, data: ImageData, indices: Tensor, batch_size: int, shuffle: bool, seed: int) -> None:
        self.data, self.indices, self.batch_size, self.shuffle = data, indices, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.indices.numel() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.indices[torch.randperm(self.indices.numel(), generator=self.gen)] if self.shuffle else self.indices
        for start in range(0, order.numel(), self.batch_size):
            idx = order[start : start + self.batch_size].to(self.data.x.device)
            yield self.data.x[idx], self.data.y[idx]


class TensorContext(MergeContext):
    """A MergeContext over user tensors: batches are slices of them as they are."""

    def fit_batches(
        self, *, shuffle: bool = False, seed: int | None = None, batch_size: int | None = None
    ) -> TensorBatches:
        seed = self.seed if seed is None else seed
        return TensorBatches(self.train, self.merge.fit, batch_size or self.batch_size, shuffle, seed)

    def select_batches(self) -> TensorBatches:
        if self.merge.val.numel() == 0:
            return self.fit_batches(batch_size=self.eval_batch_size)
        return TensorBatches(self.train, self.merge.val, self.eval_batch_size, False, self.seed)


@dataclasses.dataclass
class MergeResult:
    """The merged model (eval mode) and what the run recorded: spec check, aligner, aggregator, repair."""

    model: nn.Module
    diagnostics: dict[str, Any]

    def __iter__(self) -> Iterator[Any]:  # `merged, diagnostics = mergebench.merge(...)`
        return iter((self.model, self.diagnostics))


def _choose(registry: Registry, name: str, params: Mapping[str, Any] | None, key: str) -> Component:
    entry, parsed = registry.parse({"name": name, **(params or {})}, key)
    return Component(entry.name, entry.factory, parsed)


def merge(
    models: Sequence[nn.Module],
    *,
    align: str = "permute",
    agg: str = "avg",
    repair: str = "none",
    data: tuple[Tensor, Tensor],
    strategy: str = "all_to_one",
    align_params: Mapping[str, Any] | None = None,
    agg_params: Mapping[str, Any] | None = None,
    repair_params: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> MergeResult:
    """Merge `models` (same architecture; model 0 is the reference) on the merge data `data = (inputs, labels)`.

    The input models are not modified. `val_fraction` of the data is held out where a method selects something
    (CCA's γ, STE's permutation). Raises a one-line ConfigError for unknown names, parameters or a spec that
    fails its check."""
    if len(models) < 2:
        raise ConfigError(f"merge needs at least two models, got {len(models)}")
    x, y = data
    device = next(models[0].parameters()).device
    x, y = x.to(device), y.to(device).long()
    methods = Methods(
        _choose(ALIGNERS, align, align_params, "align"),
        _choose(AGGREGATORS, agg, agg_params, "agg"),
        _choose(REPAIRS, repair, repair_params, "repair"),
    )
    chosen = _choose(STRATEGIES, strategy, None, "merge")
    check_combination(chosen.name, len(models), methods.agg.name, methods.agg.params)
    spec, checked = checked_spec(list(models), x[:VERIFY_BATCH], None, seed=seed, repair=methods.repair.name)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * val_fraction)
    template = copy.deepcopy(models[0])
    images = ImageData(x, y)
    info = DatasetInfo("user", int(y.max()) + 1, 1, 1, (0.0,), (1.0,), augment=False)  # batches bypass it
    ctx = TensorContext(
        spec=spec,
        build_model=lambda: copy.deepcopy(template),
        train=images,
        test=images,
        info=info,
        merge=MergeData(fit=order[n_val:].sort().values, val=order[:n_val].sort().values),
        batch_size=batch_size,
        eval_batch_size=max(batch_size, 256),
        device=device,
        seed=seed,
    )
    merged = chosen.factory(chosen.params, [copy.deepcopy(m).eval() for m in models], methods, ctx)
    return MergeResult(merged.model.eval(), {**checked, **merged.diagnostics})
