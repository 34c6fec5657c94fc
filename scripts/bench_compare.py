"""Print two benchmark records (outputs/bench/<name>.json, as `mergebench.bench_record.write_record` writes them)
side by side: every figure present in either, its value in each, and new ÷ old. Figures match on every field
but the value and the measuring context (machine, torch, threads, commit), so a record taken on another machine
or commit lines up with this one.

    python scripts/bench_compare.py OLD.json NEW.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

CONTEXT = ("machine", "torch", "threads", "commit")


def load(path: Path) -> tuple[dict, dict[tuple, dict]]:
    """The record's header fields and its figures keyed by what identifies each one."""
    doc = json.loads(path.read_text())
    figures = {}
    for rec in doc["records"]:
        key = tuple(sorted((k, str(v)) for k, v in rec.items() if k not in ("value", *CONTEXT)))
        figures[key] = rec
    header = {k: doc["records"][0].get(k) for k in CONTEXT} if doc["records"] else {}
    return {"name": doc.get("name"), "created": doc.get("created"), **header}, figures


def label(key: tuple) -> str:
    fields = dict(key)
    head = fields.pop("figure", "?")
    unit = fields.pop("unit", "")
    rest = ", ".join(f"{k}={v}" for k, v in fields.items())
    return f"{head} [{unit}]" + (f" ({rest})" if rest else "")


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args()
    old_head, old = load(args.old)
    new_head, new = load(args.new)
    for field in ("name", "created", *CONTEXT):
        print(f"{field:>8}: {fmt(old_head.get(field))}  |  {fmt(new_head.get(field))}")
    keys = list(old) + [k for k in new if k not in old]
    width = max((len(label(k)) for k in keys), default=10)
    print(f"{'figure':<{width}}  {'old':>12}  {'new':>12}  {'new/old':>8}")
    for key in keys:
        a = old.get(key, {}).get("value")
        b = new.get(key, {}).get("value")
        numeric = isinstance(a, int | float) and isinstance(b, int | float)
        ratio = f"{b / a:.3f}" if numeric and a != 0 and not math.isnan(a) else "—"
        print(f"{label(key):<{width}}  {fmt(a):>12}  {fmt(b):>12}  {ratio:>8}")


if __name__ == "__main__":
    main()
