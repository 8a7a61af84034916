"""Stopping a run on a scheduler's signal without losing work.

SLURM and Kubernetes send SIGTERM (SLURM also the ``--signal`` of your choice, often SIGUSR1) before they kill a job;
Ctrl-C sends SIGINT. A handler installed by :func:`install` only records that a signal came: the training loop asks
every rank at the end of each optimizer step (in the step's one all-reduce), so all ranks finish that step, write a
checkpoint together and exit with :data:`EXIT_INTERRUPTED`. Rerunning the same command resumes from it.

A worker also asks the kernel to send it SIGTERM when its launcher dies (:func:`die_with_parent`), so killing only
the launcher stops the workers the same way instead of leaving them training on their own.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from types import FrameType

# sysexits' EX_TEMPFAIL: "a temporary failure; the user is invited to retry" -- what a requeueing scheduler needs
# to tell an interrupted run (resume it) from a finished one (0) or a broken one (anything else).
EXIT_INTERRUPTED = 75
# Written into the run directory by rank 0 once the interrupted run's checkpoint is complete: the launcher's proof
# that its workers stopped cleanly when it was the one that got the signal (the workers' exit codes are lost then).
INTERRUPTED_FILE = "interrupted.json"


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; ``checkpoint`` is where it resumes from."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(f"{signal_name} at step {step}; checkpoint {checkpoint}")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class StopRequest:
    """Whether (and which) signal asked this process to stop; set by the handlers :func:`install` registers."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name


def parse_signals(names: str) -> list[signal.Signals]:
    """``"SIGTERM SIGINT SIGUSR1"`` (space or comma separated; empty: none) -> signals; ``ValueError`` naming an
    unknown name and the valid ones."""
    signals = []
    for name in names.replace(",", " ").split():
        upper = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if upper not in signal.Signals.__members__ or upper in ("SIGKILL", "SIGSTOP"):
            raise ValueError(
                f"{name!r} is not a signal a process can catch; use names such as SIGTERM, SIGINT, SIGUSR1, SIGUSR2"
            )
        signals.append(signal.Signals[upper])
    return signals


def install(names: str) -> StopRequest:
    """Record the signals ``names`` (see :func:`parse_signals`) instead of dying on them; returns the record."""
    request = StopRequest()
    for sig in parse_signals(names):
        signal.signal(sig, request._handle)
    return request


def die_with_parent() -> None:
    """Ask the kernel to send this process SIGTERM when its parent (the torchrun launcher) dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
