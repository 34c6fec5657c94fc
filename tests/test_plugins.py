"""Plugins are found, not listed: a new aligner is one module + one YAML, and every config group's YAML files are
exactly its registry's names."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import mergebench.align
import mergebench.models
from mergebench.align import ALIGNERS
from mergebench.cli import CONF_DIR, register_default_recipes
from mergebench.config import RunConfig, validate
from mergebench.data.datasets import DATASETS
from mergebench.data.splits import SPLITS
from mergebench.merging import AGGREGATORS, REPAIRS, STRATEGIES
from mergebench.models import MODELS, ModelInput
from mergebench.registry import Registry
from mergebench.run import run
from mergebench.spec.trace import model_spec
from mergebench.spec.verify import verify_spec

GROUPS: dict[str, Registry] = {
    "align": ALIGNERS,
    "agg": AGGREGATORS,
    "repair": REPAIRS,
    "strategy": STRATEGIES,
    "model": MODELS,
    "data": SPLITS,
    "dataset": DATASETS,
}


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_group_has_one_yaml_per_registered_name(group: str) -> None:
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    assert {p.stem for p in files} == set(GROUPS[group].names())
    for path in files:  # each file selects its component with `name:`, like every other group
        assert yaml.safe_load(path.read_text())["name"] == path.stem, path


def test_every_built_in_model_has_a_spec_that_passes_the_check() -> None:
    """Its own `permutation_spec()` where it states one, else the traced spec the runtime uses: a new architecture
    needs no hand-written spec."""
    for name in MODELS.names():
        if name == "custom":  # a user's model: tests/test_custom_models.py
            continue
        entry = MODELS.get(name)
        model = entry.factory(entry.params(), ModelInput(3, 32, 10)).eval()
        x = torch.randn(4, 3, 32, 32)
        spec, _ = model_spec(model, x)
        assert spec.groups, name
        verify_spec(model, spec, x)


ALIGNER_MODULE = '''
"""A throw-away aligner: reverses the units of the first `groups` groups of model B."""

import dataclasses

import torch

from mergebench.align.registry import ALIGNERS, Alignment, PairAlignment, pairwise_aligner
from mergebench.spec import Transform


@dataclasses.dataclass
class ReverseParams:
    groups: int = 1


@ALIGNERS.register("reverse", ReverseParams, label="Reverse", abbrev="R")
@pairwise_aligner
def align_reverse(params, ref, other, ctx):
    state = other.state_dict()
    groups = ctx.spec.groups[: params.groups]
    flips = {g: Transform.permutation(torch.arange(ctx.spec.group_size(g, state)).flip(0)) for g in groups}
    return PairAlignment(flips, {"reversed": len(flips)})


@ALIGNERS.register("reverse_all", label="Reverse all", abbrev="RA")
def align_reverse_all(params, models, ctx):
    """A joint aligner: every model, model 0 too, into one shared basis (its first group reversed)."""
    group = ctx.spec.groups[0]
    flip = Transform.permutation(torch.arange(ctx.spec.group_size(group, models[0].state_dict())).flip(0))
    return Alignment([{group: flip} for _ in models], {"moved": len(models)})


align_reverse_all.keeps_first = False
'''


@pytest.fixture
def plugin_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder that joins the aligner package (as a new module in src/mergebench/align/ would) and a config
    folder with the aligner's YAML; the registry and sys.modules are restored afterwards."""
    modules, conf = tmp_path / "modules", tmp_path / "conf" / "align"
    modules.mkdir()
    conf.mkdir(parents=True)
    (modules / "reverse.py").write_text(ALIGNER_MODULE)
    (conf / "reverse.yaml").write_text("name: reverse\ngroups: 2\n")
    (conf / "reverse_all.yaml").write_text("name: reverse_all\n")
    ALIGNERS.names()  # the built-in aligners registered first, so the copy restored afterwards holds them
    monkeypatch.setattr(mergebench.align, "__path__", [*mergebench.align.__path__, str(modules)])
    monkeypatch.setattr(ALIGNERS, "_entries", dict(ALIGNERS._entries))
    yield tmp_path
    sys.modules.pop("mergebench.align.reverse", None)


def compose_and_run(overrides: list[str], out: Path) -> tuple[RunConfig, pd.DataFrame]:
    """The run a CLI command with these overrides makes, in `out`."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = validate(compose("config", overrides=overrides))
    out.mkdir(parents=True)
    return cfg, run(cfg, out)


def test_a_new_aligner_is_one_module_and_one_yaml(plugin_dirs: Path) -> None:
    assert "reverse" in ALIGNERS.names()  # found by the registry, registered by nothing but its own module
    overrides = [
        f"hydra.searchpath=[file://{plugin_dirs / 'conf'}]",
        "align=reverse",
        "model.hidden=[16,16]",
        "train.epochs=1",
        f"cache_dir={plugin_dirs / 'cache'}",
    ]
    cfg, df = compose_and_run(overrides, plugin_dirs / "out")
    assert cfg.align.name == "reverse" and cfg.align.params.groups == 2  # the YAML's value, through its dataclass
    merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    assert list(merged.method_label) == ["Reverse"] and list(merged["align"]) == ["reverse"]
    assert json.loads(merged.diagnostics.iloc[0])["align_reversed"] == 2


def test_a_new_joint_aligner_is_one_module_and_one_yaml(plugin_dirs: Path) -> None:
    """CONTRIBUTING.md's joint recipe: K models in, a transform per model out; MergeMany, which needs a fixed
    reference, runs it on all three models at once."""
    overrides = [
        f"hydra.searchpath=[file://{plugin_dirs / 'conf'}]",
        "align=reverse_all",
        "strategy=merge_many",
        "data.num_models=3",
        "model.hidden=[16,16]",
        "train.epochs=1",
        f"cache_dir={plugin_dirs / 'cache'}",
    ]
    _, df = compose_and_run(overrides, plugin_dirs / "out")
    merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    assert list(merged.method_label) == ["Reverse all"]
    assert json.loads(merged.diagnostics.iloc[0])["align_moved"] == 3


CORE_FILES = ["config.py", "run.py", "cli.py", "plots.py", "spec/verify.py"]


def _string_constants(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_the_core_names_no_component() -> None:
    """A component states its own cross-key checks, label suffix, result columns, datasets and smoke sizes (hooks on
    its params), so the core modules spell out no component name, no component-specific parameter and no paper
    layout (section keys like `repair`, the sections' defaults and matplotlib's "none" excepted)."""
    from mergebench.config import TOP_LEVEL
    from mergebench.report import LAYOUTS

    names = {n for registry in (ALIGNERS, AGGREGATORS, REPAIRS, STRATEGIES, SPLITS) for n in registry.names()}
    forbidden = (names | set(LAYOUTS) | {"stop_at", "others", "hidden"}) - TOP_LEVEL - {"same", "all_to_one", "none"}
    src = Path(mergebench.align.__file__).parents[1]
    found = {f: sorted(_string_constants(src / f) & forbidden) for f in CORE_FILES}
    assert found == {f: [] for f in CORE_FILES}


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "dataset"])
def test_every_yaml_value_is_its_dataclass_default(group: str) -> None:
    """A component's YAML lists its keys for people to read and override; the values live in one place, the Params
    dataclass (the Python API's defaults), and this keeps the two from drifting apart (the data group's files also
    state the keys every split shares, DataConfig's)."""
    from omegaconf import OmegaConf

    from mergebench.config import DataConfig

    drift = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path))
        entry = GROUPS[group].get(values.pop("name"))
        classes = [entry.params] if entry.params else []
        classes += [DataConfig] if group == "data" else []
        defaults = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for cls in classes
            for f in dataclasses.fields(cls)
        }
        drift += [
            f"{path.name}: {k}={v!r}, default {defaults.get(k, '(none)')!r}"
            for k, v in values.items()
            if defaults.get(k, object()) != v
        ]
    assert drift == []


def test_every_reference_has_its_flag_and_every_flag_its_reference() -> None:
    """The pipeline runs REFERENCES by their `references.<name>` flags and names none of them."""
    from mergebench.config import ReferencesConfig
    from mergebench.references import REFERENCES

    flags = {f.name for f in dataclasses.fields(ReferencesConfig) if f.type in ("bool", bool)}
    assert set(REFERENCES) == flags == {"ensemble", "joint", "coreset"}


ARCHITECTURE_MODULE = '''
"""A throw-away architecture: two convs and a linear head, no hand-written spec (the runtime traces one)."""

import dataclasses

from torch import nn

from mergebench.models.registry import MODELS


@dataclasses.dataclass
class TinyConvParams:
    channels: int = 8


@MODELS.register("tinyconv", TinyConvParams)
def build_tinyconv(params, data):
    c = params.channels
    return nn.Sequential(
        nn.Conv2d(data.channels, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, data.num_classes),
    )
'''


def test_a_new_architecture_is_one_module_and_one_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CONTRIBUTING.md's recipe: the module in models/ and conf/model/<name>.yaml; no permutation_spec() (the run
    traces it, checks it, and merges with activation matching) and no conf/train/<name>.yaml (TrainConfig's
    defaults, registered as its recipe by the CLI at import; here after the module joined the package)."""
    modules, conf = tmp_path / "modules", tmp_path / "conf"
    for folder in (modules, conf / "model"):
        folder.mkdir(parents=True)
    (modules / "tinyconv.py").write_text(ARCHITECTURE_MODULE)
    (conf / "model" / "tinyconv.yaml").write_text("name: tinyconv\nchannels: 8\n")
    MODELS.names()  # the built-in models registered first, so the copy restored afterwards holds them
    monkeypatch.setattr(mergebench.models, "__path__", [*mergebench.models.__path__, str(modules)])
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))
    register_default_recipes()
    try:
        overrides = [
            f"hydra.searchpath=[file://{conf}]",
            "model=tinyconv",
            "align=permute",
            "train.epochs=1",
            "train.lr=0.01",
            f"cache_dir={tmp_path / 'cache'}",
        ]
        cfg, df = compose_and_run(overrides, tmp_path / "out")
        assert cfg.train.optimizer == "sgd" and cfg.train.batch_size == 500  # TrainConfig's defaults
    finally:
        sys.modules.pop("mergebench.models.tinyconv", None)
    merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    diagnostics = json.loads(merged.diagnostics.iloc[0])
    assert list(merged["arch"]) == ["tinyconv"] and diagnostics["spec"] == "traced"
    assert diagnostics["spec_groups"] == 2 and diagnostics["align_mean_corr"] > 0


def test_every_preset_has_its_paper_layout_and_every_layout_its_preset() -> None:
    """A paper lives in its module of `mergebench.papers`: the layout registered under the preset's name is what
    `mergebench-report --paper <name>` lays the preset's runs out with."""
    from omegaconf import OmegaConf

    from mergebench.papers import layouts

    presets = {OmegaConf.load(p).name for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert presets == set(layouts())


PAPER_MODULE = """
\"\"\"A throw-away paper: one table.\"\"\"

from mergebench.papers import Layout, register

register("toy_table1", Layout("Toy Table 1 (accuracy %)", lambda r: f"{r.dataset}, hidden 16"))
"""

PAPER_PRESET = """# @package _global_
name: toy_table1
model:
  hidden: [16, 16]
train:
  epochs: 1
hydra:
  sweeper:
    params:
      seed: 0,1
"""


def test_a_new_paper_preset_is_one_module_and_one_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CONTRIBUTING.md's paper recipe: a module in papers/ registering the layout by the preset's name, and the
    preset; the preset's runs are reported in the paper's layout (no numbers of its own to show beside)."""
    import mergebench.papers
    from mergebench.report import main as report_main

    modules, conf = tmp_path / "modules", tmp_path / "conf" / "experiment"
    for folder in (modules, conf):
        folder.mkdir(parents=True)
    (modules / "toy.py").write_text(PAPER_MODULE)
    (conf / "toy_table1.yaml").write_text(PAPER_PRESET)
    monkeypatch.setattr(mergebench.papers, "__path__", [*mergebench.papers.__path__, str(modules)])
    saved = dict(mergebench.papers.LAYOUTS)
    try:
        for seed in (0, 1):
            overrides = [
                f"hydra.searchpath=[file://{conf.parent}]",
                "experiment=toy_table1",
                f"seed={seed}",
                f"cache_dir={tmp_path / 'cache'}",
            ]
            compose_and_run(overrides, tmp_path / "sweep" / str(seed))
        assert report_main([str(tmp_path / "sweep"), "--paper", "toy_table1"]) == 0
    finally:
        sys.modules.pop("mergebench.papers.toy", None)
        mergebench.papers.LAYOUTS.clear()
        mergebench.papers.LAYOUTS.update(saved)
    table = (tmp_path / "sweep" / "tables" / "toy_table1.md").read_text()
    assert "Toy Table 1" in table and "Direct averaging" in table and "(n=2)" in table
