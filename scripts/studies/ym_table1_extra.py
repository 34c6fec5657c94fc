"""YM Table 1's companion quantities (losses, barriers, weight-matching passes) from a multirun's results.csv rows.

`mergebench-report --paper ym_table1` lays out top-1 only; this script writes, per angle (mean ± std over seeds),
the merged and base losses, the interpolation-curve barriers and the weight-matching diagnostics, plus every row it
used, so that each file next to the table is rebuilt from the repository:

    python scripts/studies/ym_table1_extra.py RUNS_DIR --out docs/results/ym_table1
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from mergebench.report import load_rows

ROWS = [  # (quantity, method_label, model_role, metric, subset)
    ("WM merged top-1 %", "Weight Matching", "merged", "top1", "test"),
    ("WM merged loss", "Weight Matching", "merged", "loss", "test"),
    ("Model A top-1 %", "Model A", "base_0", "top1", "test"),
    ("Model B top-1 %", "Model B", "base_1", "top1", "test"),
    ("Model A loss", "Model A", "base_0", "loss", "test"),
    ("Model B loss", "Model B", "base_1", "loss", "test"),
    ("Ensemble top-1 %", "Ensemble", "ensemble", "top1", "test"),
    ("accuracy barrier over the curve (pts)", "Weight Matching", "barrier", "acc_barrier", "test"),
    ("accuracy barrier at α=0.5 (pts)", "Weight Matching", "barrier", "acc_barrier_mid", "test"),
    ("loss barrier over the curve", "Weight Matching", "barrier", "loss_barrier", "test"),
    ("loss barrier at α=0.5", "Weight Matching", "barrier", "loss_barrier_mid", "test"),
]
RUN_COLUMNS = ["scenario", "seed", "method_label", "model_role", "metric", "subset", "alpha", "value", "wall_s"]


def angle_of(scenario: str) -> float:
    """The rotation angle in a scenario label such as `rotated(angle=45.0,interpolation=bilinear,fill=0.0)`."""
    match = re.search(r"angle=([-0-9.]+)", scenario)
    if match is None:
        raise ValueError(f"not a rotated scenario: {scenario}")
    return float(match.group(1))


def table1_rows(folder: Path) -> pd.DataFrame:
    """The YM Table 1 runs' rows under `folder`, with their rotation `angle`."""
    rows, _ = load_rows(folder)
    if rows.empty:
        raise SystemExit(f"no results.csv under {folder}")
    rows = rows[rows.experiment.astype(str).str.startswith("ym_table1")].copy()
    rows["angle"] = rows.scenario.map(angle_of)
    return rows


def wm_diagnostics(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (angle, seed): weight matching's passes and objective, from the merged rows' diagnostics."""
    merged = rows[(rows.model_role == "merged") & rows.diagnostics.notna()].drop_duplicates(["angle", "seed"])
    out = []
    for r in merged.itertuples():
        diag = json.loads(r.diagnostics)
        out.append(
            {
                "angle": r.angle,
                "seed": r.seed,
                "wm_passes": diag.get("align_passes"),
                "wm_objective": diag.get("align_objective"),
                "wm_seconds": diag.get("align_seconds"),
            }
        )
    return pd.DataFrame(out)


def tidy(rows: pd.DataFrame) -> pd.DataFrame:
    """(quantity, angle, seed, value) for every quantity of ROWS and the weight-matching diagnostics."""
    parts = []
    for quantity, label, role, metric, subset in ROWS:
        sel = rows[(rows.method_label == label) & (rows.model_role == role) & (rows.metric == metric)]
        sel = sel[sel.subset == subset]
        parts.append(sel.assign(quantity=quantity)[["quantity", "angle", "seed", "value"]])
    diag = wm_diagnostics(rows)
    for column, quantity in (("wm_passes", "WM passes"), ("wm_objective", "WM objective")):
        if not diag.empty:
            parts.append(diag.assign(quantity=quantity, value=diag[column])[["quantity", "angle", "seed", "value"]])
    return pd.concat(parts, ignore_index=True).drop_duplicates(["quantity", "angle", "seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the YM Table 1 multirun folder(s) root")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = table1_rows(args.folder)
    long = tidy(rows)
    stats = long.groupby(["quantity", "angle"], sort=False).value.agg(["mean", "std", "count"]).reset_index()
    order = [q for q, *_ in ROWS] + ["WM passes", "WM objective"]
    cell = stats.assign(text=[f"{m:.3f} ± {0.0 if pd.isna(s) else s:.3f}" for m, s in zip(stats["mean"], stats["std"])])
    wide = cell.pivot(index="quantity", columns="angle", values="text").reindex(
        [q for q in order if q in set(cell.quantity)]
    )
    wide.columns = [f"{a:g}°" for a in wide.columns]
    args.out.mkdir(parents=True, exist_ok=True)
    wide.to_csv(args.out / "ym_table1_extra.csv")
    stats.to_csv(args.out / "ym_table1_extra_long.csv", index=False)
    runs = rows[
        rows.metric.isin(["top1", "loss", "acc_barrier", "acc_barrier_mid", "loss_barrier", "loss_barrier_mid"])
    ]
    runs[RUN_COLUMNS].sort_values(["scenario", "seed"], kind="stable").to_csv(args.out / "runs.csv", index=False)
    header = "| quantity | " + " | ".join(wide.columns) + " |"
    lines = [header, "|---" * (len(wide.columns) + 1) + "|"]
    lines += [f"| {q} | " + " | ".join(str(v) for v in wide.loc[q]) + " |" for q in wide.index]
    n = int(stats["count"].max())
    note = f"\nMean ± std over {n} seeds per angle; made by `python scripts/studies/ym_table1_extra.py`.\n"
    (args.out / "ym_table1_extra.md").write_text("\n".join(lines) + "\n" + note)
    print((args.out / "ym_table1_extra.md").read_text())


if __name__ == "__main__":
    main()
