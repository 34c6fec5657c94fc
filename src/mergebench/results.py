"""Results rows in one tidy schema, the papers' method names, CSV/JSON writing and the terminal table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from mergebench.align import ALIGNERS
from mergebench.cache import atomic_write_text
from mergebench.merging import AGGREGATORS, REPAIRS

COLUMNS = [
    "run_id", "experiment", "dataset", "split", "arch", "width", "norm", "num_models", "seed",
    "scenario", "split_params", "align", "agg", "repair", "strategy", "merge_data", "select_on", "method_label",
    "model_role", "metric", "subset", "value", "alpha", "wall_s", "diagnostics",
]  # fmt: skip

CSV_FLOAT_FORMAT = "%.7g"  # float32 carries ~7 significant digits: what a number in results.csv keeps

# rows of the papers' tables, in their order; labels not listed sort after these, alphabetically
METHOD_ORDER = [
    "Model A", "Model B", "Base models avg.", "Ensemble", "Joint", "Coreset", "Direct averaging", "Permute",
    "Weight Matching", "CCA Merge", "OT Fusion", "ZipIt!", "C2M3", "STE", "Finetune-P", "Finetune-WM", "NP-P", "NP-WM",
]  # fmt: skip


def method_label(align: str, agg: str, repair: str) -> str:
    """The papers' name for a merge ('Permute', 'NP-P', 'Finetune-WM + REPAIR') from the names each component
    registered with (`Entry.label`); a component without one is named by its config name."""
    aligner, aggregator, fix = ALIGNERS.get(align), AGGREGATORS.get(agg), REPAIRS.get(repair)
    label = (aggregator.label or f"{agg}-{{abbrev}}").format(
        align=aligner.label or align, abbrev=aligner.abbrev or aligner.label or align
    )
    return (fix.label or "{method}").format(method=label)


MODEL_COLUMNS = ("width", "norm")  # the results' model-setting columns; an architecture fills them (result_columns)


def model_columns(model_params: Any) -> dict[str, Any]:
    """The model-setting columns of a run's rows, from the architecture's `result_columns()` (blank where it has
    none, e.g. a user model)."""
    hook = getattr(model_params, "result_columns", None)
    given = hook() if hook is not None else {}
    return {key: given.get(key) for key in MODEL_COLUMNS}


def label_suffix(*components_params: Any) -> str:
    """What the chosen components add to a method's label (`label_suffix()` on their params: a partial zip's
    `stop_at`), in the order given."""
    return "".join(hook() for p in components_params if (hook := getattr(p, "label_suffix", None)) is not None)


def split_param(split_params: Any, key: str, default: Any = None) -> Any:
    """One parameter of a run's split (e.g. `angle` of `rotated`) from its `split_params` column (JSON), or
    `default` where the split has no such parameter."""
    if not isinstance(split_params, str) or not split_params:
        return default
    value = json.loads(split_params).get(key)
    return default if value is None else value


def base_label(i: int, num_models: int) -> str:
    return f"Model {chr(ord('A') + i)}" if num_models <= 26 else f"Model {i}"


@dataclasses.dataclass
class RowWriter:
    """Collects rows that share the run's identifying columns."""

    common: dict[str, Any]
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(
        self,
        label: str,
        role: str,
        results: dict[str, dict[str, float]],
        *,
        wall_s: float | None = None,
        alpha: float | None = None,
        diagnostics: dict[str, Any] | None = None,
    ) -> None:
        """One row per (subset, metric) of `results` = {subset: {metric: value}}."""
        diag = json.dumps(diagnostics, default=_jsonable) if diagnostics else ""
        for subset, values in results.items():
            for metric, value in values.items():
                self.rows.append(
                    {
                        **self.common,
                        "method_label": label,
                        "model_role": role,
                        "metric": metric,
                        "subset": subset,
                        "value": value,
                        "alpha": alpha,
                        "wall_s": wall_s,
                        "diagnostics": diag,
                    }
                )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def write(self, folder: Path) -> pd.DataFrame:
        """Atomically write results.csv (numbers to 7 significant digits: float32 accuracies carry noise such as
        83.35999846458435 beyond that) and results.json (full precision) into `folder`."""
        df = self.frame()
        atomic_write_text(folder / "results.csv", df.to_csv(index=False, float_format=CSV_FLOAT_FORMAT))
        atomic_write_text(folder / "results.json", json.dumps(self.rows, indent=1, default=_jsonable))
        return df


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def method_sort_key(label: str) -> tuple[int, str]:
    base = label.removesuffix(" + REPAIR")
    rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    if base.startswith("Model ") and base not in METHOD_ORDER:
        rank = 0
    return rank, label


def run_table(df: pd.DataFrame, title: str) -> Table:
    """One run's results: a row per evaluated model, columns = top-1/loss on the test set and top-1 per subset;
    the interpolation curve's barriers (test set), when there is a curve, as the caption."""
    barrier = df[(df.model_role == "barrier") & (df.subset == "test")]
    df = df[df.model_role != "barrier"]
    subsets = [s for s in df["subset"].unique() if s != "test"]
    has_alpha = df["alpha"].notna().any()
    table = Table(title=title)
    if len(barrier):
        values = ", ".join(f"{m} {v:.3g}" for m, v in zip(barrier.metric, barrier.value))
        table.caption = f"curve barriers (test): {values}"
    table.add_column("method")
    if has_alpha:
        table.add_column("α", justify="right")
    for col in ["top-1 test", "top-5 test", "loss test", *[f"top-1 {s}" for s in subsets]]:
        table.add_column(col, justify="right")
    keys = ["method_label", "alpha"] if has_alpha else ["method_label"]
    groups = [((k,) if not isinstance(k, tuple) else k, g) for k, g in df.groupby(keys, dropna=False, sort=False)]
    for key, g in sorted(groups, key=lambda item: method_sort_key(item[0][0])):

        def cell(metric: str, subset: str, fmt: str, g: pd.DataFrame = g) -> str:
            v = g[(g.metric == metric) & (g.subset == subset)]["value"]
            return format(v.iloc[0], fmt) if len(v) else "—"

        alpha_cell = [f"{key[1]:.2f}" if pd.notna(key[1]) else ""] if has_alpha else []
        table.add_row(
            key[0],
            *alpha_cell,
            cell("top1", "test", ".2f"),
            cell("top5", "test", ".2f"),
            cell("loss", "test", ".3f"),
            *[cell("top1", s, ".2f") for s in subsets],
        )
    return table
