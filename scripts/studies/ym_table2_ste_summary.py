"""YM Table 2's STE and Coreset AB rows: the ablation rows (seed 0) and the final cells (mean ± std over seeds,
YM's value, delta) from the runs' results.csv (top-1 on the whole test set D_AB), as docs/results/ym_table2_ste.md
quotes them:

    python scripts/studies/ym_table2_ste_summary.py outputs/ym_ste --out docs/results/ym_table2_ste

The runs are `RUNS/<group>/<run>/0/`: groups full/, coreset/, ... with runs `s<seed>_<scenario>`, and ablation/ with
runs `<setting>_s<seed>_<scenario>`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mergebench.report import load_rows

PAPER = {  # YM Table 2
    ("mnist_rmnist90", "STE (Coreset)"): 88.78,
    ("mnist_rmnist90", "Coreset AB"): 67.77,
    ("mnist_rmnist90", "STE (Full)"): 93.52,
    ("mnist_fmnist", "STE (Coreset)"): 77.77,
    ("mnist_fmnist", "Coreset AB"): 66.03,
    ("mnist_fmnist", "STE (Full)"): 83.76,
}
ABLATION = {  # folder: what differs from the new preset (seed 0)
    "ablation/old": "old preset: union 10/class (100 img), STE 10 ep lr 0.01 no wd, Coreset AB = base recipe",
    "ablation/each_client": "old preset + 10/class from each client (200 img)",
    "ablation/union": "new preset but 10/class of the union (100 img)",
    "ablation/no_wd": "new preset but STE weight decay 0",
    "ablation/constant_lr": "new preset but STE constant lr (no multi-step)",
    "ablation/fmnist_recipe": "new preset but YM's MNIST-FMNIST STE (Coreset) recipe: 5000 epochs at lr 0.5",
    "coreset": "new preset: 10/class each client, STE 1000 ep lr 0.1 wd 1e-4 multi-step, Coreset AB 200 ep lr 0.05",
    "full": "STE (Full): 5 epochs lr 0.1 wd 1e-4 on all the merge data",
    "ablation/keep_train": "new preset but the permutation of the lowest training-batch loss (align.keep=train_batch)",
    "coreset_keep_train": "new preset with YM's selection: align.keep=train_batch on all 200 images (val_fraction=0)",
    "coreset_best": "Coreset AB as YM's code reports it: the best test top-1 over its 200 epochs (no STE here)",
}


def cells(d: pd.DataFrame) -> dict[str, float]:
    """One run's STE and Coreset AB top-1 on the test set, and STE's best epoch and seconds."""
    d = d[(d.metric == "top1") & (d.subset == "test")]
    out = {}
    for _, r in d.iterrows():
        if r.model_role == "coreset":
            out["Coreset AB"] = r.value
        elif r.model_role == "merged" and r.method_label == "STE":
            out["STE"] = r.value
            diag = json.loads(r.diagnostics) if isinstance(r.diagnostics, str) else {}
            out["ste_best_epoch"] = diag.get("align_best_epoch")
            out["ste_seconds"] = diag.get("align_seconds")
    return out


def runs(root: Path) -> pd.DataFrame:
    """One row per run `ROOT/<group>/<run>/0/`: its setting, scenario, seed and cells."""
    rows, _ = load_rows(root)
    if rows.empty:
        raise SystemExit(f"no results.csv under {root}")
    out = []
    for job, d in rows.groupby("job", sort=False):  # in path order
        parts = Path(job).relative_to(root).parts
        if len(parts) != 3 or parts[2] != "0":
            continue
        group, run = parts[:2]
        prefix, _, rest = run.partition("_s")
        seed, scenario = rest.split("_", 1) if group == "ablation" else run[1:].split("_", 1)
        key = f"{group}/{prefix}" if group == "ablation" else group
        out.append(
            {
                "run": f"{group}/{run}",
                "setting": ABLATION.get(key, key),
                "scenario": scenario,
                "seed": int(seed),
                **cells(d),
            }
        )
    return pd.DataFrame(out)


def final_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Per scenario and row: mean ± std over seeds, the values, YM's number and the delta."""
    final = []
    for scenario in ("mnist_rmnist90", "mnist_fmnist"):
        for label, group, col, row in (
            ("STE (Full)", "full", "STE", "STE (Full)"),
            ("STE (Coreset), the preset: YM's selection", "coreset_keep_train", "STE", "STE (Coreset)"),
            ("STE (Coreset), held-out selection (the old preset)", "coreset", "STE", "STE (Coreset)"),
            ("Coreset AB", "coreset", "Coreset AB", "Coreset AB"),
            ("Coreset AB (best test epoch, YM's report)", "coreset_best", "Coreset AB", "Coreset AB"),
        ):
            v = df[(df.run.str.startswith(group + "/")) & (df.scenario == scenario)][col].dropna()
            if v.empty:
                continue
            paper = PAPER[(scenario, row)]
            final.append(
                {
                    "scenario": scenario,
                    "row": label,
                    "n_seeds": len(v),
                    "mean": v.mean(),
                    "std": v.std(ddof=1) if len(v) > 1 else 0.0,
                    "values": " ".join(f"{x:.2f}" for x in v),
                    "paper": paper,
                    "delta": v.mean() - paper,
                }
            )
    return pd.DataFrame(final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the folder holding full/, coreset/ and ablation/ sweep folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    df = runs(args.runs)
    print(df.to_string())
    ab = df[df.seed == 0][["run", "setting", "scenario", "seed", "STE", "Coreset AB", "ste_best_epoch", "ste_seconds"]]
    ab.to_csv(args.out / "ablation.csv", index=False, float_format="%.2f")
    fin = final_cells(df)
    print(fin.to_string())
    fin.to_csv(args.out / "final_cells.csv", index=False, float_format="%.2f")


if __name__ == "__main__":
    main()
