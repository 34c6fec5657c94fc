"""JSON records for the benchmark scripts: every `scripts/bench_*.py` writes its figures to
`outputs/bench/<name>.json`, so a run leaves something to compare later (`scripts/bench_compare.py`) instead of
a table that scrolls away. Each record carries where and how it was measured, because a figure without its
machine, torch version, thread count and commit cannot be compared with another."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(os.environ.get("MERGEBENCH_BENCH_DIR", ROOT / "outputs" / "bench"))


def git_commit() -> str:
    """The checked-out commit, with `+dirty` when the tree has changes (the figures may then not match it);
    $MERGEBENCH_COMMIT where the tree travelled without its .git (a lent GPU machine)."""
    if os.environ.get("MERGEBENCH_COMMIT"):
        return os.environ["MERGEBENCH_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> str:
    """The device the figures were taken on: the GPU name when CUDA is up, else the CPU model and core count."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


def write_record(name: str, figures: list[dict]) -> Path:
    """Write `figures` (each a dict with at least `figure`, `value`, `unit`; other keys are kept) to
    `outputs/bench/<name>.json`, each stamped with machine, torch version, threads and git commit, and return the
    path. `threads` in a figure overrides the process's current torch thread count."""
    context = {
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
    }
    records = []
    for fig in figures:
        missing = {"figure", "value", "unit"} - fig.keys()
        if missing:
            raise ValueError(f"bench figure {fig!r} lacks {sorted(missing)}")
        records.append({**context, **fig})
    doc = {"name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "records": records}
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path
