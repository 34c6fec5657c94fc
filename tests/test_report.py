"""mergebench-report: mean ± std and layout from synthetic rows, missing runs listed, paper deltas right."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import mergebench.references as references
import mergebench.run as pipeline
from mergebench.cli import CONF_DIR
from mergebench.config import validate
from mergebench.data.merge_data import MergeData, select_merge_data
from mergebench.data.splits import Scenario
from mergebench.report import LAYOUTS, build_table, main, paper_values, wide
from mergebench.results import COLUMNS, method_label
from mergebench.train import BaseModelRequest


def row(**kw) -> dict:
    base = dict.fromkeys(COLUMNS)
    base.update(
        dataset="cifar100", split="dirichlet", scenario="dirichlet(concentration=0.5)",
        split_params='{"concentration": 0.5}', arch="resnet20", width=8.0,
        num_models=2, strategy="all_to_one", merge_data="union", metric="top1", subset="test", model_role="merged",
        align="permute", agg="np", repair="reset_bn",
    )  # fmt: skip
    base.update(kw)
    return base


def rotated(angle: float) -> dict[str, str]:
    """The split columns of a rotated run: the label for people, the parameters for programs."""
    return {"scenario": f"rotated(angle={angle})", "split_params": json.dumps({"angle": angle})}


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
    assert table.loc["NP-P", "Dirichlet"] == "74.00 ± 1.00 (n=3)"
    assert table.loc["Ensemble", "Dirichlet"] == "70.00 (n=1 of 3)"
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
            row(seed=0, split="rotated", **rotated(a), method_label="Weight Matching", value=v)
            for a, v in [(0.0, 98.0), (90.0, 70.0)]
        ],
        columns=COLUMNS,
    )
    table = wide(build_table(df, LAYOUTS["ym_table1"], paper_values("ym_table1")), planned=1)
    assert table.loc["Weight Matching", "90°"] == "70.00 (n=1)"
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
    assert table.loc["NP-P", "Dirichlet"] == "74.00 ± 1.00 (n=3)"
    assert (tmp_path / "tables" / "np_table2.md").read_text().startswith("### NP Table II")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1


def test_rows_written_before_split_params_take_them_from_the_job_config(tmp_path: Path) -> None:
    for angle, value in ((0.0, 98.0), (90.0, 70.0)):
        job = tmp_path / str(int(angle))
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text(
            f"data:\n  name: rotated\n  num_models: 2\n  angle: {angle}\n  dataset:\n    name: mnist\n"
        )
        old = row(seed=0, split="rotated", scenario=f"rotated(angle={angle})", method_label="Permute", value=value)
        pd.DataFrame([old], columns=COLUMNS).drop(columns="split_params").to_csv(job / "results.csv", index=False)
    assert main([str(tmp_path), "--paper", "ym_table1"]) == 0
    table = pd.read_csv(tmp_path / "tables" / "ym_table1.csv", index_col=0)
    assert table.loc["Permute", "0°"] == "98.00 (n=1)" and table.loc["Permute", "90°"] == "70.00 (n=1)"


def test_wide_layout_exactly() -> None:
    table = wide(build_table(synthetic(), LAYOUTS["np_table2"]), planned=3)
    expected = pd.DataFrame(
        {
            "Dirichlet": ["70.00 (n=1 of 3)", "59.00 ± 1.00 (n=3)", "74.00 ± 1.00 (n=3)"],
            "80%-20%": ["—", "59.00 ± 1.00 (n=3)", "74.00 ± 1.00 (n=3)"],
        },
        index=pd.Index(["Ensemble", "Permute", "NP-P"], name="method"),
    )
    pd.testing.assert_frame_equal(table, expected)


def test_curve_points_stay_out_of_the_table() -> None:
    df = synthetic()
    curve = df[(df.method_label == "Permute") & (df.metric == "top1")].assign(model_role="curve", alpha=0.0, value=0.0)
    table = wide(build_table(pd.concat([df, curve]), LAYOUTS["np_table2"]), planned=3)
    assert table.loc["Permute", "Dirichlet"] == "59.00 ± 1.00 (n=3)"


def test_np_table4_rows_are_merges_by_aligner() -> None:
    rows = []
    for align, label in (("permute", "Permute"), ("weight_matching", "Weight Matching")):
        for agg, value in (("avg", 50.0), ("np", 60.0), ("finetune", 55.0)):
            for merge_data in ("union", "union/10pc"):
                common = dict(seed=0, align=align, agg=agg, merge_data=merge_data)
                rows.append(row(method_label=label, value=value + (merge_data == "union"), **common))
                rows.append(row(method_label="Model A", model_role="base_0", value=70.0, **common))
    table = wide(build_table(pd.DataFrame(rows, columns=COLUMNS), LAYOUTS["np_table4"]), planned=1)
    assert list(table.index) == ["Permute", "Weight Matching"]
    assert table.loc["Weight Matching", "train: merging only"] == "51.00 (n=1)"
    assert table.loc["Permute", "10: NP"] == "60.00 (n=1)" and table.loc["Permute", "10: Finetune"] == "55.00 (n=1)"


def test_ym_table2_names_rows_and_columns_as_the_paper() -> None:
    rows = []
    for split, columns, dataset in (
        ("rotated", rotated(90.0), "mnist"),
        ("cross_dataset", {"split_params": json.dumps({"others": ["fashion_mnist"]})}, "mnist+fashion_mnist"),
    ):
        common = dict(seed=0, split=split, **columns, dataset=dataset, arch="mlp", width=1.0)
        rows += [
            row(method_label="Model A", model_role="base_0", value=55.0, **common),
            row(method_label="Joint", model_role="joint", value=98.0, **common),
            row(method_label="Direct averaging", align="identity", agg="avg", value=56.0, **common),
            row(method_label="Weight Matching", align="weight_matching", agg="avg", value=71.0, **common),
            row(method_label="STE", align="ste", agg="avg", value=93.0, **common),
            row(method_label="STE", align="ste", agg="avg", merge_data="union/10pc", value=88.0, **common),
        ]
    stats = build_table(pd.DataFrame(rows, columns=COLUMNS), LAYOUTS["ym_table2"], paper_values("ym_table2"))
    table = wide(stats, planned=1)
    assert table.loc["Model AB (joint)", "MNIST-RMNIST(90°)"] == "98.00 (n=1)"
    assert table.loc["Naïve", "MNIST-FMNIST"] == "56.00 (n=1)"
    assert table.loc["STE (Coreset)", "MNIST-RMNIST(90°)"] == "88.00 (n=1)"
    assert table.loc["WM", "MNIST-RMNIST(90°) Δ"] == f"{71.0 - 70.92:+.2f}"
    assert table.loc["ZipIt!", "MNIST-FMNIST"] == "—" and table.loc["ZipIt!", "MNIST-FMNIST paper"] == "58.95"
    assert list(table.index)[:3] == ["Model A", "Model B", "Model AB (joint)"]


def test_our_extra_rows_go_where_the_papers_put_them() -> None:
    df = pd.DataFrame(
        [
            row(seed=0, split="rotated", **rotated(0.0), method_label=label, model_role=role, value=v)
            for label, role, v in [
                ("Weight Matching", "merged", 98.0),
                ("Model A", "base_0", 99.0),
                ("Ensemble", "ensemble", 99.0),
            ]
        ],
        columns=COLUMNS,
    )
    table = wide(build_table(df, LAYOUTS["ym_table1"], paper_values("ym_table1")), planned=1)
    assert list(table.index) == ["Model A", "Ensemble", "Weight Matching"]
    assert table.loc["Ensemble", "0° paper"] == "—"


def test_ym_table2_fills_zipit_and_coreset_rows_beside_the_paper() -> None:
    common = dict(seed=0, split="rotated", **rotated(90.0), dataset="mnist", arch="mlp", width=1.0)
    rows = [
        row(method_label="ZipIt!", align="zipit", agg="avg", value=71.0, **common),
        row(method_label="Coreset", model_role="coreset", merge_data="union/10pc", value=66.0, **common),
        row(method_label="Joint", model_role="joint", value=98.0, **common),
    ]
    table = wide(build_table(pd.DataFrame(rows, columns=COLUMNS), LAYOUTS["ym_table2"], paper_values("ym_table2")), 1)
    assert table.loc["ZipIt!", "MNIST-RMNIST(90°)"] == "71.00 (n=1)"
    assert table.loc["ZipIt!", "MNIST-RMNIST(90°) Δ"] == f"{71.0 - 71.35:+.2f}"
    assert table.loc["Coreset AB", "MNIST-RMNIST(90°)"] == "66.00 (n=1)"
    assert table.loc["Coreset AB", "MNIST-FMNIST paper"] == "66.03"
    order = list(table.index)
    assert order.index("Ensemble") < order.index("Coreset AB") < order.index("Naïve") < order.index("ZipIt!")


def test_ym_table8_has_ste_full_coreset_and_zipit() -> None:
    common = dict(seed=0, split="split_classes", dataset="cifar100", arch="resnet20", width=16.0)
    rows = [
        row(method_label="STE", align="ste", agg="avg", value=60.0, **common),
        row(method_label="STE", align="ste", agg="avg", merge_data="union/50pc", value=58.0, **common),
        row(method_label="ZipIt!", align="zipit", agg="avg", value=30.0, **common),
    ]
    table = wide(build_table(pd.DataFrame(rows, columns=COLUMNS), LAYOUTS["ym_table8"], paper_values("ym_table8")), 1)
    assert list(table.index) == ["STE (Full)", "STE (Coreset)", "ZipIt!"]
    assert list(table["SPLIT-CIFAR100"]) == ["60.00 (n=1)", "58.00 (n=1)", "30.00 (n=1)"]
    assert list(table["SPLIT-CIFAR100 paper"]) == ["62.94", "60.52", "27.90"]


def test_coreset_reference_trains_on_exactly_the_merge_data_and_fills_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: dict[str, torch.Tensor] = {}

    def recording(request: BaseModelRequest, *args: object) -> tuple:
        """train_or_load, noting which examples each model is trained on."""
        trained[request.label] = request.indices.cpu()
        return train_or_load(request, *args)

    train_or_load = references.train_or_load
    monkeypatch.setattr(references, "train_or_load", recording)

    def run(per_class: str) -> tuple[pd.DataFrame, Scenario, MergeData]:
        trained.clear()
        overrides = ["data=split_classes", "model.hidden=[16]", "train.epochs=1", "references.coreset=true"]
        overrides += [f"merge_data.per_class={per_class}", f"cache_dir={tmp_path / 'cache'}"]
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = validate(compose("config", overrides=overrides))
        out = tmp_path / per_class
        out.mkdir()
        df = pipeline.run(cfg, out)
        scenario = pipeline.build_scenario(cfg)
        return df, scenario, select_merge_data(scenario, cfg.merge_data)

    df, scenario, merge = run("5")
    expected = torch.cat([merge.fit, merge.val]).sort().values
    assert torch.equal(trained["coreset"], expected) and merge.val.numel() > 0
    assert torch.bincount(scenario.train.y[expected], minlength=10).tolist() == [5] * 10
    coreset = df[df.model_role == "coreset"]
    assert set(coreset.method_label) == {"Coreset"} and coreset.value.notna().all()
    table = wide(build_table(df, LAYOUTS["ym_table2"], paper_values("ym_table2")), planned=1)
    assert table.loc["Coreset AB", "SPLIT-digits"] != "—"

    df, _, _ = run("null")  # all the merge data is no coreset: no such reference
    assert "coreset" not in trained and "coreset" not in set(df.model_role)


def test_a_strategy_that_matches_by_itself_names_the_merge() -> None:
    assert method_label("c2m3", "avg", "none") == "C2M3"
    assert method_label("c2m3", "np", "repair") == "NP-C2M3 + REPAIR"
    assert method_label("permute", "np", "reset_bn") == "NP-P"
    assert method_label("permute", "fisher", "none") == "Fisher-P" and method_label("ot", "soup", "none") == "Soup-OT"


def job(folder: Path, config: dict, rows: list[dict]) -> None:
    """A finished job as Hydra and the run leave it: the resolved config beside results.csv."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    pd.DataFrame(rows, columns=COLUMNS).to_csv(folder / "results.csv", index=False)


def digits_config(seed: int, epochs: int = 1, alpha: float = 0.5, align: str = "identity") -> dict:
    return {
        "seed": seed, "cache_dir": f"/tmp/cache{seed}", "data": {"root": "./data", "name": "same", "split_seed": 0},
        "merge_data": {"seed": "${seed}"}, "train": {"epochs": epochs}, "align": {"name": align},
        "agg": {"name": "avg", "alpha": alpha},
    }  # fmt: skip


def digits_rows(seed: int, base: float, merged: float, align: str = "identity") -> list[dict]:
    label = "Direct averaging" if align == "identity" else "Permute"
    common = dict(seed=seed, dataset="digits", split="same", arch="mlp", width=1.0, num_models=2, align=align)
    return [
        row(method_label="Model A", model_role="base_0", value=base, **common),
        row(method_label=label, model_role="merged", agg="avg", value=merged, **common),
    ]


def report_outputs(folder: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The exit code, the console and every table file the report wrote, as one text."""
    code = main([str(folder), *args])
    files = "".join(p.read_text() for p in sorted((folder / "tables").glob("*.*")) if p.suffix in (".csv", ".md"))
    return code, capsys.readouterr().out, files


def test_runs_that_differ_in_epochs_are_never_pooled(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`-m train.epochs=1,3 seed=0` used to print one 'Direct averaging 9.61 ± 0.00': the mean of 9.47 and 9.75."""
    job(tmp_path / "0", digits_config(0, epochs=1), digits_rows(0, 10.03, 9.47))
    job(tmp_path / "1", digits_config(0, epochs=3), digits_rows(0, 11.70, 9.75))
    code, out, files = report_outputs(tmp_path, capsys)
    assert code == 0 and "runs differ in train.epochs (1, 3)" in out
    table = pd.read_csv(tmp_path / "tables" / "results.csv", index_col=0)
    assert table.loc["Direct averaging", "train.epochs=1"] == "9.47 (n=1)"
    assert table.loc["Direct averaging", "train.epochs=3"] == "9.75 (n=1)"
    assert table.loc["Model A", "train.epochs=3"] == "11.70 (n=1)"
    assert "9.61" not in out + files and "10.87" not in out + files


def test_a_sweep_over_alpha_keeps_alphas_apart_and_pools_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`seed=0,1 agg.alpha=0.5,0.3` used to pool the two α into 11.42 ± 1.58."""
    values = {(0, 0.5): 9.0, (1, 0.5): 11.0, (0, 0.3): 13.0, (1, 0.3): 17.0}
    for i, ((seed, alpha), merged) in enumerate(values.items()):
        job(tmp_path / str(i), digits_config(seed, alpha=alpha), digits_rows(seed, 20.0 + seed, merged))
    code, out, files = report_outputs(tmp_path, capsys)
    assert code == 0 and "runs differ in agg.alpha (0.3, 0.5)" in out
    table = pd.read_csv(tmp_path / "tables" / "results.csv", index_col=0)
    assert table.loc["Direct averaging", "agg.alpha=0.5"] == f"10.00 ± {pd.Series([9.0, 11.0]).std():.2f} (n=2)"
    assert table.loc["Direct averaging", "agg.alpha=0.3"] == f"15.00 ± {pd.Series([13.0, 17.0]).std():.2f} (n=2)"
    assert table.loc["Model A", "agg.alpha=0.3"] == table.loc["Model A", "agg.alpha=0.5"] == "20.50 ± 0.71 (n=2)"
    assert "12.50" not in out + files  # the mean over both α
    code, out, _ = report_outputs(tmp_path, capsys, "--where", "agg.alpha=0.3")
    table = pd.read_csv(tmp_path / "tables" / "results.csv", index_col=0)
    assert code == 0 and "runs differ" not in out and list(table.loc["Direct averaging"]) == ["15.00 ± 2.83 (n=2)"]


def test_a_paper_layout_gets_a_table_per_value_and_says_how_to_select(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for i, (epochs, value) in enumerate(((1, 60.0), (3, 70.0))):
        rows = [row(seed=0, split="rotated", **rotated(90.0), method_label="Weight Matching", value=value)]
        job(tmp_path / str(i), digits_config(0, epochs=epochs, align="weight_matching"), rows)
    code, out, files = report_outputs(tmp_path, capsys, "--paper", "ym_table1")
    assert code == 0
    note = next(line for line in out.splitlines() if "runs differ" in line)
    assert "ym_table1 layout has no place for" in note and "--where train.epochs=" in note
    assert "[train.epochs=1]" in out and "[train.epochs=3]" in out
    table = pd.read_csv(tmp_path / "tables" / "ym_table1.csv")
    cells = table[table.method == "Weight Matching"].set_index("train.epochs")["90°"]
    assert cells.to_dict() == {1: "60.00 (n=1)", 3: "70.00 (n=1)"}
    assert "65.00" not in out + files


def test_reference_rows_repeated_by_a_merge_sweep_stay_one_cell(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A sweep over aligners re-evaluates the same base models in every job, and a key interpolated from the seed
    (`merge_data.seed: ${seed}`) differs with it: neither splits the table."""
    for i, (seed, align) in enumerate(((0, "identity"), (0, "permute"), (1, "identity"), (1, "permute"))):
        job(tmp_path / str(i), digits_config(seed, align=align), digits_rows(seed, 50.0 + seed, 40.0 + i, align))
    code, out, _ = report_outputs(tmp_path, capsys)
    assert code == 0 and "runs differ" not in out
    table = pd.read_csv(tmp_path / "tables" / "results.csv", index_col=0)
    assert list(table.columns) == ["dataset=digits"]
    assert table.loc["Model A", "dataset=digits"] == "50.50 ± 0.71 (n=2)"
    assert table.loc["Permute", "dataset=digits"] == "42.00 ± 1.41 (n=2)"
    assert main([str(tmp_path)]) == 0  # the report's own tables/results.csv is not read back as a run
    assert "runs differ" not in capsys.readouterr().out


def test_where_names_an_unknown_key_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job(tmp_path / "0", digits_config(0), digits_rows(0, 10.0, 9.0))
    assert main([str(tmp_path), "--where", "train.epoch=3"]) == 2
    out = capsys.readouterr().out.strip()
    assert out == "error: --where train.epoch: no run has this key; did you mean train.epochs?"
    assert main([str(tmp_path), "--where", "train.epochs=7"]) == 2
    assert "its values: 1" in capsys.readouterr().out
