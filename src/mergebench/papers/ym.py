"""Yamada et al. (YM): Tables 1, 2, 3 and 8, and Table 1 as an accuracy-vs-rotation figure."""

from __future__ import annotations

import pandas as pd

from mergebench.papers import Layout, register
from mergebench.papers.names import DATASET_NAMES, merge_data_size
from mergebench.results import split_param


def _table2_column(row: pd.Series) -> str | None:
    if row.split == "rotated":
        return f"MNIST-RMNIST({float(split_param(row.get('split_params'), 'angle', 0.0)):g}°)"
    if row.split == "split_classes":
        return f"SPLIT-{DATASET_NAMES.get(row.dataset, row.dataset).replace('-', '')}"
    if row.split == "cross_dataset":
        return "-".join(DATASET_NAMES.get(d, d).upper() for d in str(row.dataset).split("+"))
    return None


def _table2_row(row: pd.Series) -> str | None:
    names = {"Joint": "Model AB (joint)", "Coreset": "Coreset AB", "Direct averaging": "Naïve", "Weight Matching": "WM"}
    if row.method_label == "STE":
        return "STE (Full)" if merge_data_size(row) == "train" else "STE (Coreset)"
    return names.get(row.method_label, row.method_label)


register(
    "ym_table1",
    Layout(
        "YM Table 1 (MLP, MNIST vs rotated MNIST, accuracy % on the mixed test set)",
        lambda r: f"{float(split_param(r.get('split_params'), 'angle', 0.0)):g}°",
        angle_figure=True,
    ),
)
register("ym_table2", Layout("YM Table 2 (accuracy % on D_AB)", _table2_column, row=_table2_row))
register(
    "ym_table3",
    Layout("YM Table 3 (SPLIT-CIFAR10, STE with k examples per class)", lambda r: f"{merge_data_size(r)}/class"),
)
register(
    "ym_table8",
    Layout("YM Table 8 (SPLIT-CIFAR100 50+50, accuracy % on the full test set)", _table2_column, row=_table2_row),
)
