"""`mergebench-report DIR [--paper NAME]`: every run's rows under DIR -> the paper's table (mean ± std over seeds).

Rows are methods in the paper's order and names, columns are the paper's settings. Failed or unfinished runs
(a job folder with a Hydra config but no results.csv) are listed, never silently dropped. A cell pools seeds and
nothing else: runs whose resolved configs differ in any other key that changes a cell's number (`train.epochs=1,3`)
get a column per value (generic layout) or a table per value (a paper layout, which has no place for the key).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import Container, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.markup import escape
from rich.table import Table

from mergebench.cache import atomic_write_text
from mergebench.config import DataConfig
from mergebench.papers import Layout, layouts, paper_values
from mergebench.plots import write_plots
from mergebench.progress import console
from mergebench.results import METHOD_ORDER, method_sort_key

LAYOUTS = layouts()

GENERIC_KEYS = ["dataset", "scenario", "arch", "width", "norm", "num_models", "strategy", "merge_data", "repair"]


def generic_layout(df: pd.DataFrame, keys: list[str] | None = None) -> Layout:
    """Columns from whichever setting keys vary across the runs (alignment/aggregation are rows), and the config
    `keys` that `splitting_keys` found (columns of `df` named by the key)."""
    varying = [k for k in GENERIC_KEYS if k in df and df[k].astype(str).nunique() > 1]
    shown = [*varying, *(keys or [])] or ["dataset"]
    return Layout("results (top-1 %, test set)", lambda r: " ".join(f"{k}={r[k]}" for k in shown))


def load_rows(folder: Path) -> tuple[pd.DataFrame, list[Path]]:
    """All results.csv rows under `folder` (column `job`: the folder each came from), and the job folders that
    have a Hydra config but no results."""
    frames, missing = [], []
    for hydra_dir in sorted(folder.rglob(".hydra")):
        if not (hydra_dir.parent / "results.csv").exists():
            missing.append(hydra_dir.parent)
    for csv in sorted(folder.rglob("results.csv")):
        try:
            frame = pd.read_csv(csv)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError):
            missing.append(csv.parent)
            continue
        if not set(frame.columns) >= RUN_COLUMNS:
            continue  # not a run's rows: e.g. the report's own tables/results.csv from an earlier report
        if "split_params" not in frame:
            frame["split_params"] = _split_params_of(csv.parent)
        frame["job"] = str(csv.parent)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return df, missing


RUN_COLUMNS = {"run_id", "method_label", "model_role", "metric", "subset", "value", "seed"}
# keys that say where a run read or wrote, not what it computed: never a reason to keep runs apart
LOCATION_KEYS = frozenset({"cache_dir", "data.root"})
ABSENT = "<absent>"  # a key one run's config has and another's lacks (e.g. an aligner's own options)
_SEED_REFERENCE = re.compile(r"(?<![\w.])seed(?![\w])")


def job_settings(jobs: list[str]) -> pd.DataFrame:
    """One row per job folder: its resolved Hydra config flattened to `a.b` -> canonical text. The seed, the keys
    interpolated from it (`${seed}`) and the location keys are left out: they are what a cell may pool over."""
    settings = {job: _settings_of(Path(job)) for job in jobs}
    return pd.DataFrame.from_dict(settings, orient="index").fillna(ABSENT).astype(str)


def _settings_of(job: Path) -> dict[str, str]:
    config = job / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    cfg = OmegaConf.load(config)
    out = {}
    for key, raw in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if key == "seed" or key in LOCATION_KEYS:
            continue
        value = raw
        if isinstance(raw, str) and "${" in raw:
            if _SEED_REFERENCE.search(raw):
                continue
            try:
                value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            except OmegaConfBaseException:
                value = raw  # a resolver only the run had (an environment variable): compare the expression
        out[key] = canonical(value)
    return out


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.removesuffix("."), node


def canonical(value: Any) -> str:
    """One text per value, as a user types it: `3`, `0.5`, `null`, `true`, `[32, 32]`, `mlp`."""
    if isinstance(value, Container):
        value = OmegaConf.to_container(value, resolve=True)
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def select(df: pd.DataFrame, settings: pd.DataFrame, where: list[str]) -> pd.DataFrame:
    """The rows of the jobs whose settings match every `KEY=VALUE` of `where`; a key no job has is one line."""
    for condition in where:
        key, sep, text = condition.partition("=")
        if not sep:
            raise ReportError(f"--where {condition!r}: expected KEY=VALUE, e.g. --where train.epochs=3")
        if key not in settings:
            close = difflib.get_close_matches(key, list(settings.columns), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(settings.columns)}"
            raise ReportError(f"--where {key}: no run has this key; {hint}")
        wanted = {text, canonical(yaml.safe_load(text))}
        jobs = settings.index[settings[key].isin(wanted)]
        if not len(jobs):
            values = ", ".join(sorted(settings[key].unique()))
            raise ReportError(f"--where {condition}: no run has {key}={text}; its values: {values}")
        settings = settings.loc[jobs]
    return df[df["job"].isin(settings.index)]


def _split_params_of(job: Path) -> str:
    """The split's parameters from a job's resolved config, for a results.csv written before its `split_params`
    column existed: the `data` keys that are not common to every split."""
    config = job / ".hydra" / "config.yaml"
    if not config.is_file():
        return ""
    data = OmegaConf.to_container(OmegaConf.load(config).get("data", {}), resolve=False)
    common = {f.name for f in dataclasses.fields(DataConfig)} | {"name", "split", "dataset"}
    return json.dumps({k: v for k, v in data.items() if k not in common})


def place(df: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """The rows a table shows (test-set metrics of one evaluated model each), with their `row` and `column`."""
    # one evaluated model per row: interpolation-curve points (and their barriers) are the plots' business
    table_roles = ~df.model_role.isin(["curve", "barrier"])
    rows = df[df.metric.isin(layout.metrics) & (df.subset == "test") & table_roles].copy()
    if rows.empty:
        return rows.assign(row=pd.Series(dtype=object), column=pd.Series(dtype=object))
    rows["row"] = rows.apply(layout.row, axis=1)
    rows["column"] = rows.apply(layout.column, axis=1)
    return rows.dropna(subset=["row", "column"])


def splitting_keys(placed: pd.DataFrame, settings: pd.DataFrame) -> list[str]:
    """The settings that would pool different runs into one cell: a merge's cell must come from one config but
    for the seed; a reference row (a base model, the ensemble) repeats unchanged in every job of a sweep over
    merge keys, so there only keys that explain a difference in its numbers count (chosen greedily, the key that
    separates the most disagreeing cells first)."""
    if placed.empty or settings.empty or "job" not in placed:
        return []
    varying = [k for k in settings.columns if settings.loc[settings.index.isin(placed["job"]), k].nunique() > 1]
    rows = placed.join(settings[varying], on="job").fillna({k: ABSENT for k in varying})
    merged = rows[rows.model_role == "merged"]
    keys = [k for k in varying if (merged.groupby(["row", "column", "metric"])[k].nunique() > 1).any()]
    references = rows[rows.model_role != "merged"].assign(value=lambda r: r["value"].round(9))
    while (count := _disagreeing(references, keys)) and (rest := [k for k in varying if k not in keys]):
        best = min(rest, key=lambda k: (_disagreeing(references, [*keys, k]), k))
        if _disagreeing(references, [*keys, best]) == count:
            break  # repeats of one config that disagree (e.g. GPU nondeterminism): no setting explains them
        keys.append(best)
    return sorted(keys)


def _disagreeing(rows: pd.DataFrame, keys: list[str]) -> int:
    """How many cells (one seed, one value of each key) hold more than one distinct number."""
    if rows.empty:
        return 0
    return int((rows.groupby(["row", "column", "metric", "seed", *keys])["value"].nunique() > 1).sum())


def build_table(df: pd.DataFrame, layout: Layout, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per method, per column `mean`, `std`, `n` (and `paper`, `delta` when given) — tidy, then pivoted.
    The rows must not differ in any setting but the seed (`splitting_keys` divides them first)."""
    rows = place(df, layout)
    # one value per (method, column, seed): a base model's rows repeat in every job of a sweep
    per_seed = rows.groupby(["row", "column", "seed"], sort=False)["value"].mean().reset_index()
    stats = per_seed.groupby(["row", "column"], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)
    if paper is not None:
        ref = paper.rename(columns={"method": "row", "setting": "column", "mean": "paper"})[["row", "column", "paper"]]
        stats = stats.merge(ref, on=["row", "column"], how="outer")
        stats["delta"] = stats["mean"] - stats["paper"]
    order = _row_order(stats["row"].unique(), paper)
    stats["row"] = pd.Categorical(stats["row"], categories=order, ordered=True)
    return stats.sort_values(["row", "column"]).reset_index(drop=True)


def _row_order(labels: list[str], paper: pd.DataFrame | None) -> list[str]:
    """The paper's rows in its order; each of our other rows goes before the first paper row it precedes in the
    papers' usual order (Model A, B, references, then merges), else at the end."""
    order = list(dict.fromkeys(paper["method"])) if paper is not None else []
    for label in sorted((lab for lab in labels if lab not in order), key=method_sort_key):
        later = [i for i, p in enumerate(order) if method_sort_key(p) > method_sort_key(label) and p in METHOD_ORDER]
        order.insert(later[0] if later else len(order), label)
    return order


def wide(stats: pd.DataFrame, planned: int) -> pd.DataFrame:
    """The paper's layout: cells `mean ± std (n=k)` over k seeds (`(n=k of m)` where fewer than planned finished;
    one seed has no ±)."""
    columns = list(dict.fromkeys(stats["column"]))
    out = pd.DataFrame(index=stats["row"].cat.categories)
    has_paper = "paper" in stats
    for col in columns:
        part = stats[stats["column"] == col].set_index("row")
        out[col] = [_cell(part, r, planned) for r in out.index]
        if has_paper:
            out[f"{col} paper"] = [_fmt(part["paper"].get(r)) for r in out.index]
            out[f"{col} Δ"] = [_fmt(part["delta"].get(r), signed=True) for r in out.index]
    out.index.name = "method"
    return out


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _cell(part: pd.DataFrame, row: str, planned: int) -> str:
    if row not in part.index or pd.isna(part.loc[row, "mean"]):
        return "—"
    n = int(part.loc[row, "count"])
    spread = f" ± {part.loc[row, 'std']:.2f}" if n > 1 else ""
    return f"{part.loc[row, 'mean']:.2f}{spread} (n={n}{f' of {planned}' if n < planned else ''})"


def rich_table(table: pd.DataFrame, title: str) -> Table:
    """The wide table for the terminal; with paper columns, each setting's cell shows ours over `paper (Δ)`."""
    settings = [c for c in table.columns if not c.endswith((" paper", " Δ"))]
    has_paper = any(c.endswith(" paper") for c in table.columns)
    caption = "ours: mean ± std over n seeds" + ("; paper value (ours − paper)" if has_paper else "")
    out = Table(title=title, caption=caption)
    out.add_column("method", no_wrap=True)
    for col in settings:
        out.add_column(col, justify="right")
    for label, values in table.iterrows():
        cells = []
        for col in settings:
            cell = str(values[col])
            if has_paper and values[f"{col} paper"] != "—":
                cell += f"\n[dim]{values[f'{col} paper']} ({values[f'{col} Δ']})[/]"
            cells.append(cell)
        out.add_row(str(label), *cells)
    return out


def markdown(table: pd.DataFrame, title: str) -> str:
    header = ["method", *map(str, table.columns)]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(label), *map(str, values)]) + " |" for label, values in table.iterrows()]
    return "\n".join(lines) + "\n"


class ReportError(Exception):
    """A report that cannot be made as asked: one line for the user."""


@dataclasses.dataclass
class Part:
    """One table of the report: the runs that share one value of each splitting key (all runs when none)."""

    values: dict[str, str]
    stats: pd.DataFrame

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items())


def parts(df: pd.DataFrame, layout: Layout, paper: pd.DataFrame | None, keys: list[str]) -> list[Part]:
    if not keys:
        return [Part({}, build_table(df, layout, paper))]
    return [
        Part(dict(zip(keys, values)), build_table(part, layout, paper)) for values, part in df.groupby(keys, sort=True)
    ]


def _describe(df: pd.DataFrame, keys: list[str]) -> str:
    return ", ".join(f"{k} ({', '.join(sorted(df[k].unique()))})" for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergebench-report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a multirun (or run) folder")
    parser.add_argument("--paper", choices=sorted(layouts()), help="lay out as this paper table, with its numbers")
    parser.add_argument("--out", type=Path, help="where to write tables/ (default: FOLDER/tables)")
    parser.add_argument("--seeds", type=int, help="seeds planned per cell (default: the most any cell has)")
    parser.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE",
        help="only runs whose resolved config has this value (repeatable), e.g. --where train.epochs=3",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"folder {args.folder} does not exist")
    df, missing = load_rows(args.folder)
    for folder in missing:
        console.print(f"[yellow]missing results:[/] {folder} (failed or unfinished run)", highlight=False)
    if df.empty:
        console.print(f"[red]error:[/] no results.csv under {args.folder}", highlight=False)
        return 1
    settings = job_settings(list(df["job"].unique()))
    try:
        df = select(df, settings, args.where)
    except ReportError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    layout = LAYOUTS[args.paper] if args.paper else generic_layout(df)
    keys = splitting_keys(place(df, layout), settings)
    df = df.join(settings[keys], on="job")
    name = args.paper or "results"
    if keys and not args.paper:
        layout = generic_layout(df, keys)
        console.print(f"runs differ in {_describe(df, keys)}: one column per value", highlight=False)
        keys = []
    elif keys:
        first = keys[0], sorted(df[keys[0]].unique())[-1]
        console.print(
            f"runs differ in {_describe(df, keys)}, which the {name} layout has no place for: one table per value; "
            f"select one with --where {first[0]}={first[1]}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    paper = paper_values(args.paper) if args.paper else None
    tables = parts(df, layout, paper, keys)
    planned = args.seeds or int(max(part.stats["count"].fillna(0).max() for part in tables))
    out_dir = args.out or args.folder / "tables"
    write_tables(tables, keys, planned, out_dir, name, layout.title)
    for part in tables:
        rows = df.loc[(df[list(part.values)] == pd.Series(part.values)).all(axis=1)] if part.values else df
        plot_dir = out_dir / part.label.replace(" ", "_") if part.values else out_dir
        for path in write_plots(rows, plot_dir, paper if layout.angle_figure else None):
            console.print(f"plot: {path}", highlight=False)
    return 0


def write_tables(tables: list[Part], keys: list[str], planned: int, out_dir: Path, name: str, title: str) -> None:
    """NAME.csv (the wide tables; with splitting keys, one block per value, the keys as leading columns),
    NAME_long.csv (tidy) and NAME.md; each table printed."""
    wides, longs, sections = [], [], []
    for part in tables:
        table = wide(part.stats, planned)
        heading = f"{title} [{part.label}]" if part.values else title
        console.print(rich_table(table, escape(heading)))
        sections.append(markdown(table, heading))
        wides.append(table.reset_index().assign(**part.values)[[*keys, "method", *table.columns]])
        longs.append(part.stats.assign(**part.values)[[*keys, *part.stats.columns]])
    wide_csv = pd.concat(wides, ignore_index=True)
    atomic_write_text(out_dir / f"{name}.csv", wide_csv.to_csv(index=False))
    atomic_write_text(out_dir / f"{name}_long.csv", pd.concat(longs, ignore_index=True).to_csv(index=False))
    atomic_write_text(out_dir / f"{name}.md", "\n".join(sections))
    console.print(f"tables: {out_dir}/{name}.csv", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
