"""Every YAML under conf/ composes and validates; every paper preset runs end to end with smoke=true."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mergebench.cli import CONF_DIR
from mergebench.config import validate
from mergebench.report import main as report_main
from tests.fake_data import write_all
from tests.test_cli import cli

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
EXPERIMENTS = [p.stem for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]
FAST = {"ym_table1"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "cross_dataset":
        overrides.append("dataset=mnist")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=overrides)
    validate(cfg)


def test_launchers_compose() -> None:
    launchers = sorted((CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
    assert {p.stem for p in launchers} >= {"submitit_slurm", "submitit_local", "joblib"}
    for path in launchers:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=[f"hydra/launcher={path.stem}"], return_hydra_config=True)
        assert cfg.hydra.launcher is not None


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all(tmp_path_factory.mktemp("data"))


def run_preset(name: str, root: Path, cwd: Path) -> pd.DataFrame:
    proc = cli(["-m", f"experiment={name}", "smoke=true", "seed=0", f"data.root={root}"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (cwd / "outputs" / "multirun").glob("*/*")
    csvs = sorted(sweep.glob("*/results.csv"))
    assert csvs, proc.stdout[-2000:]
    return pd.concat([pd.read_csv(c) for c in csvs])


@pytest.mark.parametrize(
    "name", [pytest.param(e, marks=() if e in FAST else pytest.mark.slow) for e in EXPERIMENTS]
)
def test_preset_runs_with_smoke(name: str, fake_root: Path, tmp_path: Path) -> None:
    df = run_preset(name, fake_root, tmp_path)
    merged = df[df.model_role == "merged"]
    assert len(merged) and merged.value.notna().all()
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    paper = name if not name.startswith("np_table1") else "np_table1"
    assert report_main([str(sweep), "--paper", paper]) == 0
    table = pd.read_csv(sweep / "tables" / f"{paper}.csv", index_col=0)
    assert len(table) > 0
