"""The papers whose tables mergebench reproduces, one module each (`np.py`, `ym.py`): how each table is laid out
(which row and column a result goes to, which metrics count, which figure shows it), registered by the name of the
preset that runs it (`conf/experiment/<name>.yaml` sets `name: <name>`), and the file of the paper's own numbers
(`paper_tables/<name>.csv`). `layouts()` imports every module of this package first, so a new paper is one module
here plus its presets and its numbers; `mergebench-report --paper <name>` and the figures read nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from importlib import resources

import pandas as pd

Cell = Callable[[pd.Series], str | None]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a paper lays out its table: which row and column a result goes to, and which metrics count."""

    title: str
    column: Cell
    row: Cell = lambda r: r.method_label
    metrics: tuple[str, ...] = ("top1",)
    angle_figure: bool = False  # the paper's values go on the accuracy-vs-rotation figure


LAYOUTS: dict[str, Layout] = {}


def register(name: str, layout: Layout) -> None:
    if name in LAYOUTS:
        raise RuntimeError(f"paper layout {name!r} registered twice")
    LAYOUTS[name] = layout


def layouts() -> dict[str, Layout]:
    """Every registered paper layout, by preset name (each paper module of this package imported first)."""
    for module in pkgutil.iter_modules(__path__, f"{__name__}."):
        importlib.import_module(module.name)
    return LAYOUTS


def paper_values(name: str) -> pd.DataFrame | None:
    """The paper's own numbers for the layout `name` (`method, setting, metric, mean, std`), where it has them."""
    path = resources.files("mergebench") / "paper_tables" / f"{name}.csv"
    return pd.read_csv(str(path)) if path.is_file() else None
