"""The Hydra callback of every run (conf/config.yaml: hydra.callbacks): sweep-level pause points, so that tests
interrupt a sweep before its first job, between jobs and inside one at events it announces (mergebench.pause), and
one-line Ctrl-C for sweeps whose jobs run in other processes (mergebench.interrupts)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mergebench import interrupts
from mergebench.pause import pause_point


class SweepEvents(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        pause_point("sweep_start")
        if config.hydra.launcher._target_ not in interrupts.IN_PROCESS_LAUNCHERS:
            interrupts.keep_from_children()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        interrupts.give_back()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        interrupts.take_in_job()  # before the pause point: a job paused there ends on Ctrl-C
        pause_point("job_start")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        pause_point("job_end")
