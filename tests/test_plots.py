"""The report's figures from synthetic rows: the plotted points are the seed means, endpoints are marked, and
only the figures the rows allow are written (as real PNGs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergebench.plots import accuracy_vs_angle, accuracy_vs_models, interpolation_curves, write_plots
from mergebench.report import paper_values
from mergebench.results import COLUMNS

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def row(**kw) -> dict:
    base = dict.fromkeys(COLUMNS)
    base.update(
        dataset="mnist", split="rotated", scenario="rotated(angle=90.0)", split_params='{"angle": 90.0}', arch="mlp",
        width=1.0, num_models=2,
        strategy="all_to_one", merge_data="union", repair="none", metric="top1", subset="test",
    )  # fmt: skip
    base.update(kw)
    return base


def rotated(angle: float) -> dict[str, str]:
    """The split columns of a rotated run: the label for people, the parameters for programs."""
    return {"scenario": f"rotated(angle={angle})", "split_params": json.dumps({"angle": angle})}


def plotted(ax) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (x, y) of every labelled line and error-bar series on `ax`."""
    lines = [(c.get_label(), c.lines[0]) for c in ax.containers] + [(ln.get_label(), ln) for ln in ax.get_lines()]
    return {label: (list(ln.get_xdata()), list(ln.get_ydata())) for label, ln in lines if not label.startswith("_")}


def curve_rows() -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        for angle in (90.0, 15.0):
            for label, dip in (("Weight Matching", 10.0), ("Direct averaging", 40.0)):
                for a in ALPHAS:
                    acc = 90.0 - dip * (1 - abs(2 * a - 1)) + seed  # seeds 0/1: mean = +0.5
                    common = dict(seed=seed, **rotated(angle), method_label=label, alpha=a)
                    rows.append(row(model_role="curve", metric="top1", value=acc, **common))
                    rows.append(row(model_role="curve", metric="loss", value=100.0 - acc, **common))
            rows.append(row(seed=seed, model_role="merged", method_label="Weight Matching", value=80.0))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_interpolation_curves_plot_seed_means_and_mark_endpoints() -> None:
    (fig,) = interpolation_curves(curve_rows())
    axes = np.array(fig.axes).reshape(2, 2)
    assert [ax.get_title() for ax in axes[0]] == ["θ=15°", "θ=90°"]  # numeric order, not text order
    acc_lines = {line.get_label(): line for line in axes[0][0].get_lines()}
    assert set(acc_lines) == {"Weight Matching", "Direct averaging"}
    wm = acc_lines["Weight Matching"]
    assert list(wm.get_xdata()) == ALPHAS
    assert wm.get_ydata()[2] == pytest.approx(80.5) and wm.get_ydata()[0] == pytest.approx(90.5)
    loss = {line.get_label(): line for line in axes[1][0].get_lines()}["Direct averaging"]
    assert loss.get_ydata()[2] == pytest.approx(100.0 - 50.5)
    endpoints = [c.get_offsets() for c in axes[0][0].collections if len(c.get_offsets()) == 2]
    assert any(sorted(o[:, 0]) == [0.0, 1.0] for o in endpoints)
    assert interpolation_curves(curve_rows().query("model_role != 'curve'")) == []


def fig1_rows() -> pd.DataFrame:
    rows = []
    for seed, noise in ((0, -1.0), (1, 1.0)):
        for split in ("same", "dirichlet"):
            for k in (2, 4, 8):
                common = dict(seed=seed, split=split, num_models=k, dataset="cifar100", arch="resnet20")
                rows.append(
                    row(model_role="merged", method_label="NP-P", strategy="pairwise", value=70 - k + noise, **common)
                )
                rows.append(row(model_role="merged", method_label="CCA Merge", value=60 - 2 * k + noise, **common))
                rows.append(row(model_role="ensemble", method_label="Ensemble", value=75.0, **common))
                rows.append(row(model_role="base_0", method_label="Model A", value=65.0, **common))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_accuracy_vs_number_of_models_has_a_panel_per_split() -> None:
    fig = accuracy_vs_models(fig1_rows())
    assert [ax.get_title() for ax in fig.axes] == ["balanced (same data)", "unbalanced (dirichlet)"]
    lines = plotted(fig.axes[1])
    assert set(lines) == {"Ensemble", "CCA Merge (all_to_one)", "NP-P (pairwise)"}  # base models are not plotted
    assert lines["NP-P (pairwise)"] == ([2, 4, 8], [68.0, 66.0, 62.0])
    assert accuracy_vs_models(fig1_rows().query("num_models == 2")) is None


def angle_rows() -> pd.DataFrame:
    rows = []
    for seed in (0, 1, 2):
        for angle, acc in ((0.0, 98.0), (45.0, 90.0), (90.0, 70.0)):
            split = rotated(angle)
            rows.append(row(seed=seed, **split, model_role="merged", method_label="Weight Matching", value=acc + seed))
            rows.append(row(seed=seed, **split, model_role="ensemble", method_label="Ensemble", value=99.0))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_accuracy_vs_angle_with_paper_points() -> None:
    fig = accuracy_vs_angle(angle_rows(), paper_values("ym_table1"))
    (ax,) = fig.axes
    lines = plotted(ax)
    assert lines["Weight Matching"] == ([0.0, 45.0, 90.0], [99.0, 91.0, 71.0])
    angles, values = lines["Weight Matching (paper)"]
    assert angles == [0, 15, 30, 45, 60, 75, 90] and values[-1] == pytest.approx(70.86)


def test_write_plots_writes_only_applicable_pngs(tmp_path: Path) -> None:
    rows = pd.concat([curve_rows(), angle_rows()])
    paths = write_plots(rows, tmp_path, paper_values("ym_table1"))
    assert sorted(p.name for p in paths) == ["accuracy_vs_angle.png", "interpolation.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [p.name for p in write_plots(fig1_rows(), tmp_path / "fig1")] == ["accuracy_vs_models.png"]
    assert not list(tmp_path.glob(".*.tmp"))
