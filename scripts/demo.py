"""`make demo`: offline, CPU, embedded digits. Trains two MLPs on disjoint class halves, merges them with Direct
averaging, Permute, Weight Matching, CCA Merge, OT fusion, ZipIt!, C2M3, NP-P, Finetune-P, Fisher merging and a
learned soup, and prints one table. Each row is a real `mergebench` run (same configs, same code); the base models
are trained once per setting and cached."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from rich.table import Table

from mergebench.cli import CONF_DIR
from mergebench.config import validate
from mergebench.progress import console
from mergebench.results import method_sort_key
from mergebench.run import run

OUT = Path("outputs/demo")
COMMON = ["dataset=digits", "data=split_classes", "model=mlp", "model.hidden=[128,128,128]", "train.epochs=30"]
SETTINGS = {
    "MLP (no norm)": ["model.norm=none"],
    "MLP + BN, reset_bn": ["model.norm=bn", "repair=reset_bn"],
}
METHODS = [
    ["align=identity", "agg=avg"],
    ["align=permute", "agg=avg"],
    ["align=weight_matching", "agg=avg"],
    ["align=cca", "agg=avg"],
    ["align=permute", "agg=np"],
    ["align=permute", "agg=finetune"],
    ["align=permute", "agg=fisher"],
    ["align=permute", "agg=soup"],
    ["align=ot", "agg=avg"],
    ["align=zipit", "agg=avg"],
    ["align=c2m3", "agg=avg"],
]


def main() -> None:
    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny MLPs: threads cost more than they save, and oversubscribed cores cost ~5×
    frames = []
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        for setting, extra in SETTINGS.items():
            for method in METHODS:
                overrides = COMMON + extra + method
                cfg = validate(compose("config", overrides=[*overrides, "name=demo"]))
                folder = (
                    OUT
                    / setting.replace(" ", "_").replace(",", "").replace("+", "")
                    / "_".join(o.split("=")[1] for o in method)
                )
                folder.mkdir(parents=True, exist_ok=True)
                console.log(f"[bold]{setting}[/]: mergebench {' '.join(overrides)}")
                frames.append(run(cfg, folder).assign(setting=setting))
    df = pd.concat(frames)
    top1 = df[(df.metric == "top1") & (df.subset == "test")]
    table = Table(title="mergebench demo: digits, 2 MLPs on disjoint class halves (top-1 % on the full test set)")
    table.add_column("method")
    for setting in SETTINGS:
        table.add_column(setting, justify="right")
    for label in sorted(top1.method_label.unique(), key=method_sort_key):
        cells = []
        for setting in SETTINGS:
            v = top1[(top1.method_label == label) & (top1.setting == setting)]["value"]
            cells.append(f"{v.iloc[0]:.2f}" if len(v) else "—")
        table.add_row(label, *cells)
    console.print(table)
    console.print(f"demo finished in {time.perf_counter() - start:.0f}s; per-run CSVs under {OUT}/")


if __name__ == "__main__":
    main()
