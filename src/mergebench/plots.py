"""The papers' figures from results rows, as PNGs next to the report's tables.

- interpolation curves: accuracy and loss vs α for every aligner (α = model A's weight; α = 0 is model B aligned,
  α = 1 is model A, both marked), one column per setting;
- accuracy vs number of merged models (NP Fig. 1): balanced and unbalanced panels, a line per method;
- accuracy vs rotation angle (YM Table 1): the merge, its references, and the paper's numbers.

Figures are built on `matplotlib.figure.Figure` (Agg canvas), never pyplot: no global state, no display needed.
Each function returns the Figure (tests read the plotted data from it) or None when the rows do not apply.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mergebench.results import method_sort_key, split_param

SETTING_KEYS = ["dataset", "scenario", "arch", "width", "norm", "num_models", "merge_data", "repair"]
CURVES_PER_FIGURE = 8
REFERENCE_STYLE = {"Ensemble": ":", "Base models avg.": "--", "Model A": "-.", "Model B": "-."}


def natural_key(text: str) -> list[float | str]:
    """Sorts `θ=15°` before `θ=90°` and `width=2` before `width=16`."""
    return [float(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", text))]


def _mean_std(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean and std over seeds (a seed's repeated rows, e.g. a base model in every job, count once)."""
    per_seed = rows.groupby([*by, "seed"], sort=False, dropna=False)["value"].mean().reset_index()
    out = per_seed.groupby(by, sort=False, dropna=False)["value"].agg(["mean", "std"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def _setting_label(df: pd.DataFrame) -> pd.Series:
    """What distinguishes one curve's setting from another's: the setting columns that vary in `df`."""
    varying = [k for k in SETTING_KEYS if k in df and df[k].astype(str).nunique() > 1]
    if not varying:
        return pd.Series("", index=df.index)

    def label(row: pd.Series) -> str:
        angle = split_param(row.get("split_params"), "angle")
        parts = [f"θ={float(angle):g}°" if k == "scenario" and angle is not None else f"{k}={row[k]}" for k in varying]
        return ", ".join(parts)

    return df.apply(label, axis=1)


def interpolation_curves(df: pd.DataFrame) -> list[Figure]:
    """Accuracy (top row) and loss (bottom row) vs α, a line per aligner, a column per setting (≤ 8 per figure)."""
    rows = df[(df["model_role"] == "curve") & (df["subset"] == "test") & df["metric"].isin(["top1", "loss"])].copy()
    if rows.empty:
        return []
    rows["setting"] = _setting_label(rows)
    stats = _mean_std(rows, ["setting", "method_label", "metric", "alpha"])
    settings = sorted(stats["setting"].unique(), key=natural_key)
    figures = []
    for start in range(0, len(settings), CURVES_PER_FIGURE):
        chunk = settings[start : start + CURVES_PER_FIGURE]
        fig = Figure(figsize=(3.2 * len(chunk) + 0.8, 6.0), layout="constrained")
        axes = fig.subplots(2, len(chunk), squeeze=False, sharex=True, sharey="row")
        for col, setting in enumerate(chunk):
            for row, (metric, ylabel) in enumerate([("top1", "top-1 accuracy (%)"), ("loss", "test loss")]):
                ax = axes[row][col]
                part = stats[(stats["setting"] == setting) & (stats["metric"] == metric)]
                for label in sorted(part["method_label"].unique(), key=method_sort_key):
                    line = part[part["method_label"] == label].sort_values("alpha")
                    (drawn,) = ax.plot(line["alpha"], line["mean"], marker=".", label=label)
                    ax.fill_between(line["alpha"], line["mean"] - line["std"], line["mean"] + line["std"], alpha=0.2)
                    ends = line[line["alpha"].isin([0.0, 1.0])]
                    ax.scatter(ends["alpha"], ends["mean"], s=60, color=drawn.get_color(), edgecolor="black", zorder=3)
                ax.grid(alpha=0.3)
                if col == 0:
                    ax.set_ylabel(ylabel)
                if row == 0:
                    ax.set_title(setting or "interpolation", fontsize=9)
                else:
                    ax.set_xlabel("α (0 = model B aligned, 1 = model A)", fontsize=8)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Interpolation between model A and the aligned model B (● endpoints)")
        figures.append(fig)
    return figures


def accuracy_vs_models(df: pd.DataFrame) -> Figure | None:
    """NP Fig. 1: top-1 vs number of merged models, a panel per split (balanced = same data, unbalanced =
    Dirichlet), a line per method and strategy, the ensemble and the base models' mean as references."""
    test = df[(df["metric"] == "top1") & (df["subset"] == "test")].copy()
    if test.empty or test["num_models"].nunique() < 2:
        return None
    test["panel"] = test["split"].map(lambda s: "balanced (same data)" if s == "same" else f"unbalanced ({s})")
    merged = test["model_role"] == "merged"
    test.loc[merged, "line"] = test.loc[merged, "method_label"] + " (" + test.loc[merged, "strategy"] + ")"
    references = test["model_role"].isin(["ensemble", "base_avg"])
    test.loc[references, "line"] = test.loc[references, "method_label"]
    stats = _mean_std(test.dropna(subset=["line"]), ["panel", "line", "num_models"])
    panels = sorted(stats["panel"].unique())
    fig = Figure(figsize=(5.0 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel in zip(axes, panels):
        part = stats[stats["panel"] == panel]
        for line in sorted(part["line"].unique(), key=method_sort_key):
            points = part[part["line"] == line].sort_values("num_models")
            style = REFERENCE_STYLE.get(line, "-")
            ax.errorbar(
                points["num_models"], points["mean"], yerr=points["std"], label=line, linestyle=style, marker="o",
                capsize=3,
            )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(part["num_models"].unique()), labels=[str(k) for k in sorted(part["num_models"].unique())])
        ax.set_title(panel)
        ax.set_xlabel("number of merged models")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy vs number of merged models (NP Fig. 1 layout)")
    return fig


def accuracy_vs_angle(df: pd.DataFrame, paper: pd.DataFrame | None = None) -> Figure | None:
    """YM Table 1 as a figure: top-1 on the mixed test set vs θ for the merge and the references (mean ± std
    over seeds), with the paper's numbers (setting column `θ°`) when given."""
    test = df[(df["metric"] == "top1") & (df["subset"] == "test")].copy()
    test = test[test["model_role"].isin(["merged", "ensemble", "base_avg", "base_0", "base_1", "joint"])]
    if test.empty:
        return None
    test["angle"] = test["split_params"].map(lambda s: float(split_param(s, "angle", default=math.nan)))
    test = test.dropna(subset=["angle"])  # runs of a split with a rotation angle
    if test["angle"].nunique() < 2:
        return None
    stats = _mean_std(test, ["method_label", "angle"])
    fig = Figure(figsize=(8.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for label in sorted(stats["method_label"].unique(), key=method_sort_key):
        points = stats[stats["method_label"] == label].sort_values("angle")
        ax.errorbar(
            points["angle"], points["mean"], yerr=points["std"], label=label,
            linestyle=REFERENCE_STYLE.get(label, "-"), marker="o", capsize=3,
        )  # fmt: skip
    if paper is not None:
        for label, part in paper.groupby("method", sort=False):
            angles = part["setting"].str.removesuffix("°").astype(float)
            ax.plot(angles, part["mean"], linestyle="none", marker="x", markersize=8, color="black",
                    label=f"{label} (paper)")  # fmt: skip
    ax.set_xticks(sorted(stats["angle"].unique()))
    ax.set_xlabel("rotation θ of model B's data (degrees)")
    ax.set_ylabel("top-1 accuracy on the mixed test set (%)")
    ax.set_title("Merging MNIST and MNIST rotated by θ (YM Table 1 layout)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
    return fig


def write_plots(df: pd.DataFrame, out_dir: Path, angle_paper: pd.DataFrame | None = None) -> list[Path]:
    """Every figure the rows allow, as PNGs in `out_dir`; returns their paths. `angle_paper`: a paper's values to
    mark on the accuracy-vs-angle figure (a layout that has one says so: `Layout.angle_figure`)."""
    figures: list[tuple[str, Figure]] = []
    curves = interpolation_curves(df)
    figures += [(f"interpolation{'' if len(curves) == 1 else f'_{i}'}", fig) for i, fig in enumerate(curves)]
    if (fig := accuracy_vs_models(df)) is not None:
        figures.append(("accuracy_vs_models", fig))
    if (fig := accuracy_vs_angle(df, angle_paper)) is not None:
        figures.append(("accuracy_vs_angle", fig))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures:
        path = out_dir / f"{stem}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png", dpi=120)
        tmp.replace(path)
        paths.append(path)
    return paths
