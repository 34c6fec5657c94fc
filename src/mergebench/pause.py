"""Named points at which a run can be told to announce itself and wait, so that tests interrupt it at an event
(`kill -9` mid-training, Ctrl-C mid-merge) instead of after a sleep that a fast or a loaded machine gets wrong.

`MERGEBENCH_PAUSE_AT=<point>` pauses at the first arrival of this process at `point`; `<point>@<n>` at the n-th.
The run prints `MERGEBENCH_PAUSED <point>` on stdout and blocks until it is killed or interrupted.
"""

from __future__ import annotations

import collections
import os
import time

PAUSE_ENV = "MERGEBENCH_PAUSE_AT"
MARKER = "MERGEBENCH_PAUSED"
# run_start: after the output folder exists; train_epoch: after an epoch, lock held; merge: before merging.
# sweep_start: the multirun's main process, before the launcher starts any job; job_start / job_end: before a job's
# task and after its results are written, in the process that runs the job: the main one under the basic launcher,
# a worker under joblib (same stdout), a job process under submitit (its marker goes to the job's log).
POINTS = ("run_start", "train_epoch", "merge", "sweep_start", "job_start", "job_end")
_arrivals: collections.Counter[str] = collections.Counter()


def pause_point(point: str) -> None:
    """Block here when `MERGEBENCH_PAUSE_AT` names this arrival at `point`; otherwise a dictionary lookup."""
    assert point in POINTS, point
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition("@")
    if name != point:
        return
    _arrivals[point] += 1
    if _arrivals[point] != int(nth or 1):
        return
    print(f"{MARKER} {point}", flush=True)
    while True:
        time.sleep(3600)
