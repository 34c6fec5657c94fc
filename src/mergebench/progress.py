"""Progress of long loops: a rich bar on a terminal; log lines when stdout is a file (SLURM, nohup, CI), where a
bar would print nothing until the end."""

from __future__ import annotations

import logging
import os
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# A console that is not a terminal (a file, a pipe, a SLURM log) would cut tables to 80 columns and wrap cells over
# several lines: there nothing is too wide to read, so a table keeps its natural width.
FILE_WIDTH = 10_000
console = Console() if Console().is_terminal else Console(width=FILE_WIDTH)
log = logging.getLogger("mergebench")
LOG_EVERY_ENV = "MERGEBENCH_LOG_EVERY"  # seconds between log lines (default 30); 0 logs every epoch


def announce(message: str) -> None:
    """A one-off event of a run (a cache hit, a skipped reference): timestamped by rich on a terminal, a log line
    in the run's log format otherwise, so a file log has one format."""
    if console.is_terminal:
        console.log(message, highlight=False)
    else:
        log.info("%s", message)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class EpochProgress:
    """One loop of `epochs` × `steps` steps. On a terminal: a rich bar. Otherwise: a log line per epoch, at most
    one every 30 s (`MERGEBENCH_LOG_EVERY`), and always the last, with loss, lr, images/s and the ETA."""

    def __init__(self, label: str, epochs: int, steps: int) -> None:
        self.label, self.epochs, self.steps = label, epochs, steps
        self.bar = progress_bar()
        self.task = self.bar.add_task(label, total=epochs * steps, status=f"epoch 1/{epochs}")
        self.every = float(os.environ.get(LOG_EVERY_ENV, "30"))
        self.start = self.last_log = time.perf_counter()
        self.images = 0

    def __enter__(self) -> EpochProgress:
        self.bar.__enter__()
        self.start = self.last_log = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.bar.__exit__(kind, value, tb)

    def step(self, images: int) -> None:
        self.images += images
        self.bar.advance(self.task)

    def epoch_end(self, epoch: int, loss: float, lr: float | None = None, extra: str = "") -> None:
        """`epoch` counts from 1."""
        now = time.perf_counter()
        elapsed = now - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        parts = [f"epoch {epoch}/{self.epochs}", f"loss {loss:.4f}"]
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        parts.append(f"{rate:,.0f} img/s")
        if extra:
            parts.append(extra)
        status = " ".join(parts)
        self.bar.update(self.task, status=status)
        if console.is_terminal or not (epoch == self.epochs or now - self.last_log >= self.every):
            return
        self.last_log = now
        eta = elapsed / epoch * (self.epochs - epoch)
        log.info("%s: %s ETA %s", self.label, status, _duration(eta))
