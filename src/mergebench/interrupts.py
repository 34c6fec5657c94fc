"""Ctrl-C in a sweep whose jobs run in other processes (hydra/launcher=joblib, submitit_local, ...).

A terminal sends SIGINT to its whole foreground process group: to mergebench and to every worker, submitit
controller and job process it started, each of which would print its own traceback (submitit's controllers on the
terminal). While such a launcher starts and waits for its jobs, mergebench blocks SIGINT, so the processes started
then inherit it blocked (a signal mask survives fork and exec) and a helper thread turns the signal into
KeyboardInterrupt in the main thread: mergebench prints the one line and exits 130. A job's own process unblocks
SIGINT when its job starts (a Ctrl-C that came while it started is delivered there) and ends quietly with 130;
joblib's idle workers, and submitit's controllers, never see it and end with their jobs or with mergebench.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from types import FrameType
from typing import NoReturn

INTERRUPTED = "interrupted: finished runs and cached models are kept; run the same command again to resume"
IN_PROCESS_LAUNCHERS = {"hydra._internal.core_plugins.basic_launcher.BasicLauncher"}  # jobs in mergebench's thread
_SIGINT = {signal.SIGINT}
_kept_from_children = contextlib.ExitStack()  # module state: Hydra pickles its callbacks into the jobs


class JobInterrupted(SystemExit):
    """Ends a job's process on Ctrl-C (code 130): silent at exit, and no Exception to Hydra or submitit. joblib
    hands it to mergebench, which may get it before its own KeyboardInterrupt and says the one line for it."""


def keep_from_children() -> None:
    """From now on, processes this thread starts inherit SIGINT blocked; this process still gets KeyboardInterrupt
    (the launchers wait by polling, so it lands within their poll interval). Nothing changes where Ctrl-C is not
    a KeyboardInterrupt here (ignored, as in a background job) or the platform lacks sigtimedwait (macOS)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler or not hasattr(signal, "sigtimedwait"):
        return
    done = threading.Event()

    def forward() -> None:
        while not done.is_set():
            if signal.sigtimedwait(_SIGINT, 0.1) is not None:
                _thread.interrupt_main()
                return

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)
    helper = threading.Thread(target=forward, name="mergebench-sigint", daemon=True)
    helper.start()
    _kept_from_children.callback(signal.pthread_sigmask, signal.SIG_SETMASK, previous)
    _kept_from_children.callback(helper.join)
    _kept_from_children.callback(done.set)


def give_back() -> None:
    """Undo keep_from_children (the sweep ended): a Ctrl-C still pending is raised here."""
    _kept_from_children.close()


def take_in_job() -> None:
    """In a job's process started with SIGINT blocked: end quietly on it (mergebench prints the one line)."""
    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()):
        signal.signal(signal.SIGINT, _end_job)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGINT)


def _end_job(signum: int, frame: FrameType | None) -> NoReturn:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # submitit's controller may forward a second one
    raise JobInterrupted(130)  # finally blocks run on the way out
