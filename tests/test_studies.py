"""The study scripts (scripts/studies/): each names its command, answers --help, and each that reads runs' rows (through
the report's loader) writes its files from real runs on the embedded digits data, laid out as its docstring says."""

from __future__ import annotations

import ast
import runpy
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO
from tests.test_plugins import compose_and_run

STUDIES = REPO / "scripts" / "studies"
SCRIPTS = sorted(STUDIES.glob("*.py"))
SMALL = ["dataset=digits", "model.hidden=[32,32]", "train.epochs=1", "seed=0"]


def study(name: str, *args: object, capsys: pytest.CaptureFixture | None = None) -> str:
    """Run scripts/studies/NAME.py as `python scripts/studies/NAME.py ARGS` does (as __main__); its stdout."""
    argv = sys.argv
    sys.argv = [str(STUDIES / f"{name}.py"), *map(str, args)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    return capsys.readouterr().out if capsys is not None else ""


def test_the_study_scripts_are_found() -> None:
    assert len(SCRIPTS) >= 7 and not list((REPO / "scripts").glob("ym_*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_study_names_its_command(script: Path) -> None:
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    assert f"python scripts/studies/{script.name}" in doc, f"{script.name}: its docstring names no command"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_no_study_finds_results_files_itself(script: Path) -> None:
    """Runs' rows come from the report's loader (mergebench.report.load_rows), which also skips a report's own
    tables and names failed runs, never from a script's own search for results.csv."""
    tree = ast.parse(script.read_text())
    documented = (ast.Module, ast.FunctionDef, ast.ClassDef)
    docstrings = {
        id(node.body[0].value)  # type: ignore[attr-defined]
        for node in ast.walk(tree)
        if isinstance(node, documented) and ast.get_docstring(node, clean=False) is not None
    }
    names = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]
    assert not [n for n in names if n.endswith("results.csv")], f"{script.name} globs results.csv itself"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_study_answers_help(script: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        study(script.stem, "--help")
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real runs, laid out as the studies' docstrings say their runs are (one shared base-model cache):
    rotated/  a YM Table 1 job (45°, weight matching, interpolation curve), also the ablation's and the preset's
    cnn/      weight matching with each repair, on the same base models
    ste/      STE with a Coreset AB reference, as ste/<group>/<run>/0/"""
    root = tmp_path_factory.mktemp("runs")
    cache = f"cache_dir={root / 'cache'}"
    rotated = [*SMALL, cache, "name=ym_table1", "data=rotated", "data.angle=45", "align=weight_matching"]
    compose_and_run([*rotated, "curve.points=3"], root / "rotated" / "0")
    for config in ("adam_std_e20_s0", "sgdm_const_unit_e20_s0"):  # two of the ablation's configurations
        shutil.copytree(root / "rotated" / "0", root / "ablation" / config / "0")
    for repair in ("none", "repair", "reset_bn"):
        compose_and_run([*SMALL, cache, "name=cnn", "align=weight_matching", f"repair={repair}"], root / "cnn" / repair)
    ste = [*SMALL, cache, "name=ym_table2", "align=ste", "references.coreset=true", "merge_data.per_class=5"]
    for run in ("coreset/s0_mnist_rmnist90", "full/s0_mnist_rmnist90", "ablation/old_s0_mnist_rmnist90"):
        compose_and_run(ste, root / "ste" / run / "0")
    return root


def rows_of(folder: Path) -> pd.DataFrame:
    rows = pd.concat([pd.read_csv(p) for p in sorted(folder.rglob("results.csv"))], ignore_index=True)
    return rows[(rows.metric == "top1") & (rows.subset == "test")]


def value(rows: pd.DataFrame, role: str, **where: str) -> float:
    sel = rows[rows.model_role == role]
    for key, wanted in where.items():
        sel = sel[sel[key] == wanted]
    return float(sel.value.iloc[0])


def test_table2_runs(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = study("ym_table2_runs", runs / "rotated", "--out", tmp_path / "runs.csv", capsys=capsys)
    table = pd.read_csv(tmp_path / "runs.csv")
    merged = table[(table.model_role == "merged") & (table.metric == "top1")]
    assert len(merged) == 1 and merged.wm_passes.iloc[0] >= 1 and merged.wm_objective.notna().all()
    assert merged.value.iloc[0] == pytest.approx(value(rows_of(runs / "rotated"), "merged"))
    assert "Weight Matching" in out


def test_table1_extra(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study("ym_table1_extra", runs / "rotated", "--out", tmp_path, capsys=capsys)
    wide = pd.read_csv(tmp_path / "ym_table1_extra.csv", index_col=0)
    merged = value(rows_of(runs / "rotated"), "merged")
    assert wide.loc["WM merged top-1 %", "45°"] == f"{merged:.3f} ± 0.000"
    assert {"accuracy barrier over the curve (pts)", "WM passes"} <= set(wide.index)
    assert "made by `python scripts/studies/ym_table1_extra.py`" in (tmp_path / "ym_table1_extra.md").read_text()
    assert set(pd.read_csv(tmp_path / "runs.csv").metric) >= {"top1", "loss", "acc_barrier"}


def test_table1_ablation(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study("ym_table1_ablation", runs / "ablation", "--preset", runs / "rotated", "--out", tmp_path, capsys=capsys)
    table = pd.read_csv(tmp_path / "ablation.csv", dtype=str)
    assert list(table.config) == ["adam_std_e20", "sgdm_const_unit_e20", "preset_sweep_e20"]
    merged = value(rows_of(runs / "rotated"), "merged")
    assert set(table["WM 45°"]) == {f"{merged:.2f}"} and set(table["WM 90°"]) == {"—"}
    for name in ("adam_std_e20.csv", "wm_diagnostics.csv", "ablation.md", "ablation_compact.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    out = study("ym_table1_ablation", runs / "ablation", "--commands", capsys=capsys)
    assert "hydra.sweep.dir=" in out and "adam_std_e20_s$s" in out


def test_cnn_barriers(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = study("ym_cnn_barriers", runs / "cnn", "--out", tmp_path, "--min-base", 0, capsys=capsys)
    barriers = pd.read_csv(tmp_path / "barriers.csv")
    assert sorted(barriers.repair) == ["none", "repair", "reset_bn"]
    rows = rows_of(runs / "cnn")
    none = barriers[barriers.repair == "none"].iloc[0]
    assert none.barrier == pytest.approx(value(rows, "base_avg", repair="none") - value(rows, "merged", repair="none"))
    fraction = pd.read_csv(tmp_path / "repair_fraction.csv")
    assert len(fraction) == 1 and bool(fraction.trained.iloc[0])
    assert len(pd.read_csv(tmp_path / "barrier_by_width.csv")) == 1
    assert (tmp_path / "barriers.md").read_text().count("| cnn | mlp |") == 3
    assert "fraction removed, trained pairs" in out


def test_table2_ste_summary(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study("ym_table2_ste_summary", runs / "ste", "--out", tmp_path, capsys=capsys)
    rows = rows_of(runs / "ste" / "coreset")
    ablation = pd.read_csv(tmp_path / "ablation.csv")
    assert list(ablation.run) == [
        "ablation/old_s0_mnist_rmnist90",
        "coreset/s0_mnist_rmnist90",
        "full/s0_mnist_rmnist90",
    ]
    assert ablation.setting.iloc[0].startswith("old preset")
    final = pd.read_csv(tmp_path / "final_cells.csv").set_index("row")
    assert final.loc["Coreset AB", "mean"] == pytest.approx(value(rows, "coreset"), abs=0.005)
    full = rows_of(runs / "ste" / "full")
    assert final.loc["STE (Full)", "mean"] == pytest.approx(value(full, "merged"), abs=0.005)
    assert set(final.scenario) == {"mnist_rmnist90"} and final.n_seeds.eq(1).all()


def test_ensemble_rule_scores_the_cached_base_models(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = " ".join([*SMALL, f"cache_dir={runs / 'cache'}"])
    study("ym_ensemble_rule", "--job", job, "--out", tmp_path / "rule.csv", capsys=capsys)
    table = pd.read_csv(tmp_path / "rule.csv")
    test = table[table.subset == "test"].set_index("rule").top1
    assert len(test) == 3  # logits, log-softmax, softmax
    ensemble = value(rows_of(runs / "cnn" / "none"), "ensemble")
    assert test["logits (mergebench)"] == pytest.approx(ensemble) == test["log-softmax (YM's code)"]


def test_rotation_check(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study("ym_rotation_check", "--root", shared_data, "--images", 20, "--out", tmp_path / "rot.csv", capsys=capsys)
    table = pd.read_csv(tmp_path / "rot.csv")
    assert len(table) == 12 and (table.images == 20).all()
    by_mode = table.groupby("ours").mean_abs_diff.mean()
    assert by_mode["bilinear"] < by_mode["nearest"]  # ours bilinear is PIL's bilinear, to within rounding
