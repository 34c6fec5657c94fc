"""Shared fixtures: the repo's paths, the real-data skip, and one torch thread for the tiny test models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the real datasets (MNIST/raw, ...): $MERGEBENCH_DATA as the CLI reads it, else this repository's own neighbour
# folder. Every real-data skip names this folder in its reason, which is how the summary line below finds them.
SHARED_DATA = Path(os.environ.get("MERGEBENCH_DATA") or REPO.parent / "shared" / "data").expanduser()


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """Test models are tiny: one intra-op thread avoids paying thread synchronisation on every op. The runs the tests
    start as subprocesses inherit OMP_NUM_THREADS=1: beside a second pytest worker, torch's threads would wait on
    each other for a core (an 11 s preset smoke run took 109 s under `pytest -n 2` without it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """The real-data root; skips (named in the terminal summary) when it holds no MNIST."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line naming the tests skipped for want of real data, so a run elsewhere never passes them silently."""
    skipped = [
        report.nodeid
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple) and str(SHARED_DATA) in report.longrepr[2]
    ]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} real-data test(s) skipped, no data under {SHARED_DATA}: {', '.join(skipped)}; "
            "set MERGEBENCH_DATA=<folder with MNIST/raw and the other datasets they name> to run them",
            yellow=True,
        )


@pytest.fixture(scope="module")
def modules() -> tuple[ModuleType, ModuleType]:
    """(torchvision, timm) for the zoo tests, or a skip saying in one line why they cannot be imported here."""
    from mergebench import zoo

    try:
        return zoo.torchvision(), zoo.timm()
    except zoo.ZooUnavailable as err:
        pytest.skip(str(err))
