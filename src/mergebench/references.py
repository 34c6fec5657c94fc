"""What one run works with (its data on the device, how it builds, trains and evaluates models, the base models
and their rows), and the references reported beside every merge (DESIGN §5.4): the base models' ensemble, the
joint model trained on every client's data, and the Coreset model trained on the merge data.

A reference is one function in REFERENCES, run in order when its flag `references.<name>` is on, so the pipeline
(`run.merge_and_evaluate`) names none of them: a new reference is one function here and one flag in
`ReferencesConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from mergebench.cache import ModelCache
from mergebench.checkpoints import load_models
from mergebench.config import RunConfig, TrainConfig
from mergebench.data.datasets import DatasetInfo, ImageData
from mergebench.data.loader import to_device
from mergebench.data.merge_data import MergeData
from mergebench.data.splits import Scenario
from mergebench.evaluate import ensemble_logits, metrics, predict, subset_metrics
from mergebench.models import ModelInput
from mergebench.progress import announce
from mergebench.results import RowWriter, base_label
from mergebench.train import BaseModelRequest, train_best_epoch, train_or_load

Results = dict[str, dict[str, float]]  # subset -> metric -> value


@dataclasses.dataclass
class RunModels:
    """The run's data on its device, and how it builds, trains (or loads from the cache) and evaluates models."""

    cfg: RunConfig
    scenario: Scenario
    device: torch.device
    train: ImageData
    test: ImageData

    @property
    def info(self) -> DatasetInfo:
        return self.scenario.info

    @classmethod
    def on(cls, cfg: RunConfig, scenario: Scenario, device: torch.device) -> RunModels:
        return cls(cfg, scenario, device, to_device(scenario.train, device), to_device(scenario.test, device))

    def model_input(self) -> ModelInput:
        return ModelInput(self.info.channels, self.info.size, self.info.num_classes)

    def build(self) -> nn.Module:
        return self.cfg.model.factory(self.cfg.model.params, self.model_input()).to(self.device)

    def request(
        self, label: str, indices: Tensor, init_seed: int, recipe: TrainConfig | None = None
    ) -> BaseModelRequest:
        augment = self.info.augment if self.cfg.dataset.augment is None else self.cfg.dataset.augment
        model, recipe = self.cfg.model, recipe or self.cfg.train
        return BaseModelRequest(
            label, self.train, indices, self.info, model.name, model.params, recipe, augment, init_seed
        )

    def trained(
        self, label: str, indices: Tensor, init_seed: int, recipe: TrainConfig | None = None
    ) -> tuple[nn.Module, dict]:
        return train_or_load(
            self.request(label, indices, init_seed, recipe), self.build, ModelCache(self.cfg.cache_dir)
        )

    def evaluate(self, model: nn.Module) -> tuple[Tensor, Results]:
        """The model's test logits and its metrics on every named test subset."""
        logits = predict(model, self.test, torch.arange(len(self.test)), self.info, self.cfg.eval.batch_size)
        return logits, subset_metrics(logits, self.test.y, self.scenario.test_subsets)


@dataclasses.dataclass
class BaseModels:
    models: list[tuple[nn.Module, dict]]  # (model, its training or loading record)
    logits: list[Tensor]  # each model's test logits

    @property
    def modules(self) -> list[nn.Module]:
        return [m for m, _ in self.models]


def base_models(run: RunModels, writer: RowWriter) -> BaseModels:
    """The user's checkpoints or the trained (cached) base models, one per client, each evaluated into its rows,
    and their average row."""
    cfg = run.cfg
    if cfg.checkpoints:  # the user's weights: nothing is trained
        models = load_models(cfg.checkpoints, run.build)
    else:
        models = [run.trained(f"base {k}", idx, cfg.seed + k) for k, idx in enumerate(run.scenario.clients)]
    logits, results = [], []
    for k, (model, meta) in enumerate(models):
        model_logits, model_results = run.evaluate(model)
        logits.append(model_logits)
        results.append(model_results)
        writer.add(base_label(k, len(models)), f"base_{k}", model_results, wall_s=meta.get("wall_s"))
    writer.add("Base models avg.", "base_avg", _mean_results(results))
    return BaseModels(models, logits)


Reference = Callable[[RunModels, BaseModels, MergeData, RowWriter], None]
REFERENCES: dict[str, Reference] = {}


def reference(name: str) -> Callable[[Reference], Reference]:
    def register(fn: Reference) -> Reference:
        REFERENCES[name] = fn
        return fn

    return register


@reference("ensemble")
def ensemble(run: RunModels, bases: BaseModels, merge: MergeData, writer: RowWriter) -> None:
    """The base models' averaged softmax on every test subset."""
    logits, labels = ensemble_logits(bases.logits), run.test.y.cpu()
    writer.add("Ensemble", "ensemble", {s: metrics(logits[i], labels[i]) for s, i in run.scenario.test_subsets.items()})


@reference("joint")
def joint(run: RunModels, bases: BaseModels, merge: MergeData, writer: RowWriter) -> None:
    """One model trained on every client's data: what merging tries to approach without sharing it."""
    model, meta = run.trained("joint", torch.unique(torch.cat(run.scenario.clients)), run.cfg.seed)
    writer.add("Joint", "joint", run.evaluate(model)[1], wall_s=meta.get("wall_s"))


@reference("coreset")
def coreset(run: RunModels, bases: BaseModels, merge: MergeData, writer: RowWriter) -> None:
    """A model trained from scratch on the merge data, where that is a coreset (YM's Coreset AB)."""
    cfg = run.cfg
    if cfg.merge_data.per_class is None:  # all the merge data: the joint model (or a client's), not a coreset
        announce("references.coreset: skipped, the merge data is not a coreset (merge_data.per_class=null)")
        return
    indices, recipe = coreset_indices(merge), cfg.references.coreset_recipe(cfg.train)
    if cfg.references.coreset_report == "last":
        model, meta = run.trained("coreset", indices, cfg.seed, recipe)
        diagnostics = None
    else:  # YM's protocol: the best test top-1 over the coreset model's epochs
        model, meta = train_best_epoch(
            run.request("coreset", indices, cfg.seed, recipe), run.build, lambda m: run.evaluate(m)[1]["test"]["top1"]
        )
        diagnostics = {"coreset_report": "best_test_epoch", **meta}
    writer.add("Coreset", "coreset", run.evaluate(model)[1], wall_s=meta.get("wall_s"), diagnostics=diagnostics)


def coreset_indices(merge: MergeData) -> Tensor:
    """Every example the merge methods may read (the fit part and the validation carve-out they select on): what
    the Coreset reference is trained on from scratch, so it has the same data budget as the merges."""
    return torch.cat([merge.fit, merge.val]).sort().values


def _mean_results(results: list[Results]) -> Results:
    return {
        subset: {metric: float(np.mean([r[subset][metric] for r in results])) for metric in values}
        for subset, values in results[0].items()
    }
