"""Plugins are found, not listed: a new aligner is one module + one YAML, and every config group's YAML files are
exactly its registry's names."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import mergebench.align
from mergebench.align import ALIGNERS
from mergebench.cli import CONF_DIR
from mergebench.config import validate
from mergebench.data.datasets import DATASETS
from mergebench.data.splits import SPLITS
from mergebench.merge import AGGREGATORS, REPAIRS, STRATEGIES
from mergebench.models import MODELS, Architecture, ModelInput
from mergebench.registry import Registry
from mergebench.run import run

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


def test_every_built_in_model_states_its_permutation_spec() -> None:
    for name in MODELS.names():
        if name == "custom":  # a user's model gets a traced spec
            continue
        entry = MODELS.get(name)
        model = entry.factory(entry.params(), ModelInput(3, 32, 10))
        assert isinstance(model, Architecture), name
        assert model.permutation_spec().groups, name


ALIGNER_MODULE = '''
"""A throw-away aligner: reverses the units of the first `groups` groups of model B."""

import dataclasses

import torch

from mergebench.align.registry import ALIGNERS, PairAlignment, pairwise_aligner
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
    monkeypatch.setattr(mergebench.align, "__path__", [*mergebench.align.__path__, str(modules)])
    monkeypatch.setattr(ALIGNERS, "_entries", dict(ALIGNERS._entries))
    yield tmp_path
    sys.modules.pop("mergebench.align.reverse", None)


def test_a_new_aligner_is_one_module_and_one_yaml(plugin_dirs: Path) -> None:
    assert "reverse" in ALIGNERS.names()  # found by the registry, registered by nothing but its own module
    overrides = [
        f"hydra.searchpath=[file://{plugin_dirs / 'conf'}]",
        "align=reverse",
        "model.hidden=[16,16]",
        "train.epochs=1",
        f"cache_dir={plugin_dirs / 'cache'}",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = validate(compose("config", overrides=overrides))
    assert cfg.align.name == "reverse" and cfg.align.params.groups == 2  # the YAML's value, through its dataclass
    out = plugin_dirs / "out"
    out.mkdir()
    df = run(cfg, out)
    merged = df[(df.model_role == "merged") & (df.metric == "top1") & (df.subset == "test")]
    assert list(merged.method_label) == ["Reverse"] and list(merged["align"]) == ["reverse"]
    assert json.loads(merged.diagnostics.iloc[0])["align_reversed"] == 2


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
