"""Plugins are found, not listed: a new aligner is one module + one YAML, and every config group's YAML files are
exactly its registry's names."""

from __future__ import annotations

import ast
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
