"""YM Table 2's per-run rows (top-1 and loss on the mixed test set, per seed) and weight matching's diagnostics.

`mergebench-report --paper ym_table2` gives mean ± std per cell; this script keeps every run's value beside it, so the
per-seed numbers quoted in docs/results/README.md are files of the repository:

    python scripts/studies/ym_table2_runs.py outputs/ym_final2/ym_table2 --out docs/results/ym_table2/runs.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mergebench.report import load_rows

COLUMNS = ["scenario", "seed", "method_label", "model_role", "metric", "value", "align", "wm_objective", "wm_passes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a YM Table 2 multirun folder (or a folder of them)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, _ = load_rows(args.folder)
    if rows.empty:
        raise SystemExit(f"no results.csv under {args.folder}")
    rows = rows[rows.metric.isin(["top1", "loss"]) & (rows.subset == "test")].copy()

    def diag(text: object, key: str) -> object:
        return json.loads(text).get(key) if isinstance(text, str) else None

    rows["wm_objective"] = rows.diagnostics.map(lambda d: diag(d, "align_objective"))
    rows["wm_passes"] = rows.diagnostics.map(lambda d: diag(d, "align_passes"))
    rows = rows[COLUMNS].drop_duplicates(["scenario", "seed", "method_label", "model_role", "metric"])
    rows = rows.sort_values(["scenario", "method_label", "metric", "seed"], kind="stable")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out, index=False)
    top1 = rows[rows.metric == "top1"]
    print(top1.pivot_table(index=["scenario", "method_label"], columns="seed", values="value").round(2).to_string())


if __name__ == "__main__":
    main()
