"""Accuracy barriers of permuted-and-averaged CNNs from multirun results: how much REPAIR removes (VGG11 without BN)
and how the barrier changes with width (ResNet20 with BN, `reset_bn`).

The barrier of a merge is `mean(top-1 of A, top-1 of B) - top-1 of the merge` on the test set; the fraction REPAIR
removes is `(merge with repair - merge without) / (barrier without repair)`, per seed:

    python scripts/studies/ym_cnn_barriers.py outputs/cnn --out docs/results/cnn_fmnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from mergebench.report import load_rows


def load(folder: Path) -> pd.DataFrame:
    rows, _ = load_rows(folder)
    if rows.empty:
        raise SystemExit(f"no results.csv under {folder}")
    return rows[(rows.metric == "top1") & (rows.subset == "test")]


def barriers(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run: arch, width, repair, seed, the base models, their average, the ensemble and the merge."""
    keys = ["experiment", "arch", "width", "norm", "repair", "seed"]  # experiment: the run's name (its recipe)
    roles = {"base_0": "A", "base_1": "B", "base_avg": "base avg", "ensemble": "ensemble", "merged": "merged"}
    wide = rows[rows.model_role.isin(list(roles))].pivot_table(
        index=keys, columns="model_role", values="value", aggfunc="first"
    )
    wide = wide.rename(columns=roles).reset_index()
    wide["barrier"] = wide["base avg"] - wide["merged"]
    return wide


def repair_fraction(table: pd.DataFrame, min_base: float) -> pd.DataFrame:
    """Per (arch, width, seed): the barrier without repair, with it, and the fraction REPAIR removes; `trained` is
    false where a base model stayed below `min_base` % (a failed training makes the barrier meaningless)."""
    keys = ["experiment", "arch", "width", "seed"]
    none = table[table.repair == "none"].set_index(keys)
    fixed = table[table.repair == "repair"].set_index(keys)
    repaired = fixed[["merged", "barrier"]].rename(columns=lambda c: f"{c} (repair)")
    both = none[["base avg", "merged", "barrier"]].join(repaired, how="inner")
    both["fraction removed"] = (both["merged (repair)"] - both["merged"]) / both["barrier"]
    both["trained"] = none[["A", "B"]].min(axis=1) >= min_base
    return both.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-base", type=float, default=20.0, help="top-1 %% below which a base model failed")
    args = parser.parse_args()
    table = barriers(load(args.folder))
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "barriers.csv", index=False)
    (args.out / "barriers.md").write_text(runs_markdown(table))
    fraction = repair_fraction(table, args.min_base)
    fraction.to_csv(args.out / "repair_fraction.csv", index=False)
    pd.set_option("display.width", 200)
    print(table.round(2).to_string(index=False))
    print(fraction.round(3).to_string(index=False))
    trained = fraction[fraction.trained]
    print(f"fraction removed, trained pairs: {trained['fraction removed'].mean():.3f} over {len(trained)}")
    by_width = barrier_by_width(table[table.repair == "reset_bn"])
    by_width.to_csv(args.out / "barrier_by_width.csv", index=False)
    (args.out / "barrier_by_width.md").write_text(markdown(by_width))
    print(by_width.round(2).to_string(index=False))


def barrier_by_width(table: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, arch, width): the mean over seeds of the base models' average, the merge and the barrier,
    the barrier's std and range, and how many seeds."""
    grouped = table.groupby(["experiment", "arch", "width"])
    out = grouped.agg(
        base_avg=("base avg", "mean"),
        merged=("merged", "mean"),
        mean=("barrier", "mean"),
        std=("barrier", "std"),
        min=("barrier", "min"),
        max=("barrier", "max"),
        count=("barrier", "count"),
    )
    return out.reset_index()


def runs_markdown(table: pd.DataFrame) -> str:
    """One row per run, as barriers.csv, for the results README."""
    lines = [
        "| run | arch | width | repair | seed | A | B | mean(A,B) | ensemble | merged | barrier |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r.experiment} | {r.arch} | ×{r.width:g} | {r.repair} | {r.seed} | {r.A:.2f} | {r.B:.2f} |"
            f" {r['base avg']:.2f} | {r.ensemble:.2f} | {r.merged:.2f} | {r.barrier:.2f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(by_width: pd.DataFrame) -> str:
    lines = [
        "| run | arch | width | mean(A,B) | merged | barrier, mean ± std | barrier range | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in by_width.itertuples():
        lines.append(
            f"| {r.experiment} | {r.arch} | ×{r.width:g} | {r.base_avg:.2f} | {r.merged:.2f} |"
            f" {r.mean:.2f} ± {r.std:.2f} | {r.min:.2f} – {r.max:.2f} | {r.count} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
