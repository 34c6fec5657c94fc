"""mergebench-report: mean ± std and layout from synthetic rows, missing runs listed, paper deltas right."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mergebench.report import LAYOUTS, build_table, main, paper_values, wide
from mergebench.results import COLUMNS


def row(**kw) -> dict:
    base = dict.fromkeys(COLUMNS)
    base.update(
        dataset="cifar100", split="dirichlet", scenario="dirichlet(concentration=0.5)", arch="resnet20", width=8.0,
        num_models=2, strategy="all_to_one", merge_data="union", metric="top1", subset="test", model_role="merged",
        align="permute", agg="np", repair="reset_bn",
    )  # fmt: skip
    base.update(kw)
    return base


def synthetic() -> pd.DataFrame:
    rows = []
    for seed, (np_v, perm_v) in enumerate([(73.0, 58.0), (74.0, 59.0), (75.0, 60.0)]):
        for split in ("dirichlet", "split_80_20"):
            rows.append(row(seed=seed, split=split, method_label="NP-P", value=np_v))
            rows.append(row(seed=seed, split=split, method_label="Permute", agg="avg", value=perm_v))
            rows.append(row(seed=seed, split=split, method_label="NP-P", value=1.0, metric="loss"))
    rows.append(row(seed=0, split="dirichlet", method_label="Ensemble", model_role="ensemble", value=70.0))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_mean_std_and_layout() -> None:
    stats = build_table(synthetic(), LAYOUTS["np_table2"])
    np_dir = stats[(stats.row == "NP-P") & (stats.column == "Dirichlet")].iloc[0]
    assert np_dir["mean"] == pytest.approx(74.0) and np_dir["std"] == pytest.approx(1.0) and np_dir["count"] == 3
    table = wide(stats, planned=3)
    assert list(table.columns) == ["Dirichlet", "80%-20%"]
    assert table.loc["NP-P", "Dirichlet"] == "74.00 ± 1.00"
    assert table.loc["Ensemble", "Dirichlet"] == "70.00 ± 0.00 (n=1)"
    assert table.loc["Ensemble", "80%-20%"] == "—"
    assert list(table.index).index("Ensemble") < list(table.index).index("Permute") < list(table.index).index("NP-P")


def test_paper_deltas() -> None:
    stats = build_table(synthetic(), LAYOUTS["np_table2"], paper_values("np_table2"))
    table = wide(stats, planned=3)
    assert table.loc["NP-P", "Dirichlet paper"] == "73.45"
    assert table.loc["NP-P", "Dirichlet Δ"] == "+0.55"
    assert table.loc["Permute", "80%-20% Δ"] == f"{59.0 - 62.11:+.2f}"
    # paper rows we did not run still appear, in the paper's order
    assert list(table.index)[:3] == ["Base models avg.", "Ensemble", "Direct averaging"]
    assert table.loc["CCA Merge", "Dirichlet"] == "—"


def test_ym_table1_columns_from_angle() -> None:
    df = pd.DataFrame(
        [
            row(seed=0, split="rotated", scenario=f"rotated(angle={a})", method_label="Weight Matching", value=v)
            for a, v in [(0.0, 98.0), (90.0, 70.0)]
        ],
        columns=COLUMNS,
    )
    table = wide(build_table(df, LAYOUTS["ym_table1"], paper_values("ym_table1")), planned=1)
    assert table.loc["Weight Matching", "90°"] == "70.00 ± 0.00"
    assert table.loc["Weight Matching", "90° Δ"] == "-0.86"


def test_cli_writes_tables_and_lists_missing_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    df = synthetic()
    for seed in range(3):
        job = tmp_path / str(seed)
        (job / ".hydra").mkdir(parents=True)
        df[df.seed == seed].to_csv(job / "results.csv", index=False)
    (tmp_path / "3" / ".hydra").mkdir(parents=True)  # a job that died before writing results
    assert main([str(tmp_path), "--paper", "np_table2"]) == 0
    out = capsys.readouterr().out
    assert "missing results" in out and "/3" in out
    table = pd.read_csv(tmp_path / "tables" / "np_table2.csv", index_col=0)
    assert table.loc["NP-P", "Dirichlet"] == "74.00 ± 1.00"
    assert (tmp_path / "tables" / "np_table2.md").read_text().startswith("### NP Table II")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
