"""The Python API: merge models already in memory, with the same aligners, aggregators and repairs as the CLI.

    merged, diagnostics = mergebench.merge([model_a, model_b], align="permute", agg="avg", repair="repair",
                                           data=train_loader)
    merged, diagnostics = mergebench.merge([model_a, model_b], align="weight_matching")  # data-free

`data` is the merge data, inputs as the models take them (no normalisation is applied) and their labels: an
`(inputs, labels)` pair of tensors, a DataLoader, or any iterable of `(inputs, labels)` batches. It is read once
into two tensors rather than streamed: the methods that use it pass over it several times (REPAIR, BatchNorm resets,
NP's epochs), hold a seeded part of it out to select on and shuffle it with the run's seed, none of which a
one-shot generator allows, and merge data is small by construction (a loader is read whole, in the order it gives:
a shuffling one holds out other samples each call). Methods that read weights only (weight matching, identity, OT
on weights, C2M3, a plain average, no repair) need no data.

The permutation spec is the models' own `permutation_spec()` or traced, and it is verified on model B before
anything is aligned, exactly as in a CLI run: on `example_inputs` where given, else on the merge data's first
inputs, else on seeded random inputs of the shape the models' first conv or linear layer takes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergebench.align import ALIGNERS
from mergebench.context import MergeContext
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.merge_data import MergeData
from mergebench.errors import ConfigError
from mergebench.merging import AGGREGATORS, REPAIRS, STRATEGIES
from mergebench.merging.registry import Methods
from mergebench.merging.strategies import check_combination
from mergebench.modes import evaluating
from mergebench.registry import Component, Registry
from mergebench.spec.verify import VERIFY_BATCH, checked_spec

MergeInput = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
"""An `(inputs, labels)` pair of tensors, a DataLoader, or any iterable of `(inputs, labels)` batches."""

# methods that read the merge data whatever their settings: without data they stop before anything runs. One that
# reads it only with some setting (align.cost=acts; strategy=merge_many's BatchNorm resets) or a plugin stops when it
# asks for it (DataFreeContext).
NEEDS_DATA = {
    "align": ("permute", "cca", "zipit", "ste"),
    "agg": ("np", "finetune", "fisher", "soup"),
    "repair": ("repair", "reset_bn"),
}
DATA_FORMS = "data=(inputs, labels), a DataLoader or an iterable of (inputs, labels) batches"
DATA_FREE = "align=weight_matching, identity, ot or c2m3; agg=avg; repair=none"
SIDES = (32, 28, 224)  # image sides tried for a conv net's random check inputs (CIFAR, MNIST, ImageNet), in order
SHAPE_EXAMPLE = "example_inputs=<a batch of inputs, or its shape such as (1, 3, 32, 32)>"


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
class DataFreeContext(TensorContext):
    """The context of a merge without data: a method that asks for merge data stops it with one line (NEEDS_DATA
    stops the known ones earlier); `chosen` names the merge's methods."""

    chosen: str = ""

    def fit_batches(
        self, *, shuffle: bool = False, seed: int | None = None, batch_size: int | None = None
    ) -> TensorBatches:
        raise ConfigError(f"{self.chosen} reads merge data with these settings: pass {DATA_FORMS}")

    def select_batches(self) -> TensorBatches:
        return self.fit_batches()


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


def _kind(obj: object) -> str:
    """What a value the API cannot use is, for its one-line error."""
    if isinstance(obj, Tensor):
        return f"a tensor of shape {list(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {list(obj)[:4]}"
    if isinstance(obj, tuple | list):
        items = ", ".join(type(item).__name__ for item in obj[:3]) + (", ..." if len(obj) > 3 else "")
        return f"a {type(obj).__name__} of {len(obj)} element{'s' * (len(obj) != 1)} ({items})"
    if isinstance(obj, torch.utils.data.Dataset):  # map-style: indexed, not iterated
        return f"a {type(obj).__name__}, which yields single samples"
    return f"of type {type(obj).__name__}"


def _is_pair(obj: object) -> bool:
    return isinstance(obj, tuple | list) and len(obj) == 2 and all(isinstance(t, Tensor) for t in obj)


def merge_tensors(data: MergeInput, device: torch.device) -> tuple[Tensor, Tensor]:
    """The merge data as one tensor of inputs and one of class labels on `device`, read once (module docstring);
    anything else than (inputs, labels) batches of one input shape stops with one line."""
    pair = _is_pair(data)
    if not pair and (not isinstance(data, Iterable) or isinstance(data, Tensor | str | bytes | Mapping)):
        raise ConfigError(f"data is {_kind(data)}; pass {DATA_FORMS}")
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for i, batch in enumerate([data] if pair else data):
        where = "data" if pair else f"data's batch {i}"
        if not _is_pair(batch):
            raise ConfigError(f"{where} is {_kind(batch)}, not (inputs, labels); pass {DATA_FORMS}")
        x, y = batch
        if x.dim() == 0 or y.dim() == 0:
            raise ConfigError(
                f"{where} is one sample (a label of shape {list(y.shape)}), not a batch: a Dataset yields samples; "
                "pass DataLoader(dataset, batch_size=...)"
            )
        if y.dim() != 1 or len(y) != len(x):
            raise ConfigError(
                f"{where} has labels of shape {list(y.shape)} for {len(x)} inputs: labels are class indices, "
                "one per input"
            )
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise ConfigError(f"{where} has inputs of shape {list(x.shape[1:])}, batch 0 {list(xs[0].shape[1:])}")
        xs.append(x.detach().to(device))
        ys.append(y.detach().to(device))
    if not xs:
        raise ConfigError(f"data holds no batches; pass {DATA_FORMS}")
    return torch.cat(xs), torch.cat(ys).long()


def _forward_error(model: nn.Module, x: Tensor) -> str | None:
    """Why `model` cannot take `x` (one eval-mode forward of two samples, no gradients, its modes restored), or None."""
    try:
        with evaluating(model), torch.no_grad():
            model(x[:2])
    except Exception as err:  # whatever the user's forward raises on these inputs is the reason
        return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return None


def _random_inputs(model: nn.Module, shape: Sequence[int], seed: int) -> Tensor:
    """VERIFY_BATCH seeded standard-normal inputs of one input's `shape`, of the model's dtype and device."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    x = torch.randn(VERIFY_BATCH, *shape, generator=torch.Generator().manual_seed(seed), dtype=param.dtype)
    return x.to(param.device)


def _inferred_inputs(model: nn.Module, seed: int) -> tuple[Tensor, str]:
    """Random inputs of the shape the model's first conv or linear layer takes (a conv net's image side: the first
    of SIDES the model runs on), and their description; one line asking for example_inputs where none fits."""
    layers = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
    name, layer = next(((n, m) for n, m in model.named_modules() if isinstance(m, layers)), ("", None))
    if isinstance(layer, nn.Linear) and layer.in_features > 0:
        shapes = [(layer.in_features,)]
    elif isinstance(layer, nn.modules.conv._ConvNd) and layer.in_channels > 0:
        shapes = [(layer.in_channels, *[side] * len(layer.kernel_size)) for side in SIDES]
    else:
        found = f"its first layer {name} is {type(layer).__name__}" if layer is not None else "it has no conv/linear"
        raise ConfigError(
            f"without data the spec check runs on random inputs, but {found}, so their shape is unknown: "
            f"pass {SHAPE_EXAMPLE}"
        )
    errors = []
    for shape in shapes:
        x = _random_inputs(model, shape, seed)
        error = _forward_error(model, x)
        if error is None:
            return x, f"random, shape {list(x.shape)} from {name}"
        errors.append(f"{list(shape)}: {error}")
    raise ConfigError(
        f"without data the spec check runs on random inputs, but the model takes none of the shapes its first layer "
        f"{name} suggests ({errors[0]}{'; ...' if len(errors) > 1 else ''}): pass {SHAPE_EXAMPLE}"
    )


def check_inputs(
    model: nn.Module, x: Tensor | None, example_inputs: Tensor | Sequence[int] | None, seed: int
) -> tuple[Tensor, str]:
    """What the spec check runs on, and where it came from: `example_inputs` (a batch, or its shape, whose batch size
    is replaced by VERIFY_BATCH), else the merge data's first inputs `x`, else random inputs of an inferred shape.
    Inputs the model does not take stop here with one line."""
    if isinstance(example_inputs, Tensor):
        inputs, source = example_inputs.to(next(model.parameters()).device)[:VERIFY_BATCH], "example_inputs"
    elif example_inputs is not None:
        shape = list(example_inputs)
        if len(shape) < 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ConfigError(f"example_inputs={example_inputs!r} must be a tensor or a shape such as (1, 3, 32, 32)")
        inputs = _random_inputs(model, shape[1:], seed)
        source = "random, example_inputs' shape"
    elif x is not None:
        inputs, source = x[:VERIFY_BATCH], "data"
    else:
        return _inferred_inputs(model, seed)
    error = _forward_error(model, inputs)
    if error is not None:
        hint = "; a shape includes the batch dimension" if source.startswith("random") else ""
        raise ConfigError(
            f"the models do not take the spec check's inputs ({source}) of shape {list(inputs.shape)}: {error}{hint}"
        )
    return inputs, source


def merge(
    models: Sequence[nn.Module],
    *,
    align: str = "permute",
    agg: str = "avg",
    repair: str = "none",
    data: MergeInput | None = None,
    example_inputs: Tensor | Sequence[int] | None = None,
    strategy: str = "all_to_one",
    align_params: Mapping[str, Any] | None = None,
    agg_params: Mapping[str, Any] | None = None,
    repair_params: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> MergeResult:
    """Merge `models` (same architecture; model 0 is the reference), on the merge data `data` where the methods
    need it (module docstring); `example_inputs`, a batch or its shape, is what the spec check runs on.

    The input models are not modified. `val_fraction` of the data is held out where a method selects something
    (CCA's γ, STE's permutation). Raises a one-line ConfigError for unknown names or parameters, data the methods
    need but do not get, data or inputs of the wrong form, and a spec that fails its check."""
    if len(models) < 2:
        raise ConfigError(f"merge needs at least two models, got {len(models)}")
    methods = Methods(
        _choose(ALIGNERS, align, align_params, "align"),
        _choose(AGGREGATORS, agg, agg_params, "agg"),
        _choose(REPAIRS, repair, repair_params, "repair"),
    )
    chosen = _choose(STRATEGIES, strategy, None, "strategy")
    check_combination(chosen.name, len(models), methods.agg.name, methods.agg.params)
    if data is None:
        for key, component in zip(NEEDS_DATA, (methods.align, methods.agg, methods.repair), strict=True):
            if component.name in NEEDS_DATA[key]:
                raise ConfigError(
                    f"{key}={component.name} needs merge data: pass {DATA_FORMS}, or choose data-free methods "
                    f"({DATA_FREE})"
                )
    device = next(models[0].parameters()).device
    x, y = merge_tensors(data, device) if data is not None else (None, None)
    inputs, source = check_inputs(models[0], x, example_inputs, seed)
    spec, checked = checked_spec(list(models), inputs, None, seed=seed, check=methods.check_spec)
    if x is None or y is None:  # no batches to give: the context refuses any method that asks for them
        x, y = torch.empty(0), torch.empty(0, dtype=torch.long)
        names = f"align={methods.align.name}, agg={methods.agg.name}, repair={methods.repair.name}"
        context: Callable[..., MergeContext] = functools.partial(
            DataFreeContext, chosen=f"{names}, strategy={chosen.name}"
        )
    else:
        context = TensorContext
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * val_fraction)
    template = copy.deepcopy(models[0])
    images = ImageData(x, y)
    classes = int(y.max()) + 1 if len(y) else 0
    ctx = context(
        spec=spec,
        build_model=lambda: copy.deepcopy(template),
        train=images,
        test=images,
        info=DatasetInfo("user", classes, 1, 1, (0.0,), (1.0,), augment=False),  # batches bypass it
        merge=MergeData(fit=order[n_val:].sort().values, val=order[:n_val].sort().values),
        batch_size=batch_size,
        eval_batch_size=max(batch_size, 256),
        device=device,
        seed=seed,
    )
    merged = chosen.factory(chosen.params, [copy.deepcopy(m).eval() for m in models], methods, ctx)
    return MergeResult(merged.model.eval(), {**checked, "verify_inputs": source, **merged.diagnostics})
