"""Nothing waits silently: what a command is waiting on, said while it waits.

A command names the phases of its start (loading weights, building ops, the process group's rendezvous, the first
batch, ...) with what each waits on (a file, a port, a rank) through :func:`phase`. A phase that lasts longer than
``VZT_WAIT_REPORT_S`` seconds (default 30) is reported on stderr -- which phase, for how long, what it waits on --
and again every ``VZT_WAIT_REPORT_S`` seconds until it ends; a phase that ends sooner says nothing. A daemon thread
reports, so a main thread blocked in a lock, a socket or a C++ call is still described.

Under the launcher (``bash train.sh``), a rank does not print its reports: it keeps its phase in
``status-rank<R>.json`` in the launcher's folder (:data:`~visionzip_tune.errors.ERROR_DIR_ENV`), where the launcher
reads every rank's and prints the ranks that wait (:class:`RankBoard`): one output says where each rank of the node
stands, also a rank too stuck to print.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from visionzip_tune.errors import ERROR_DIR_ENV, UserError

REPORT_ENV = "VZT_WAIT_REPORT_S"
DEFAULT_REPORT_S = 30.0
STATUS_GLOB = "status-rank*.json"

T = TypeVar("T")
_NOTHING = object()
WaitsOn = str | Callable[[], str]  # what a phase waits on; a callable is asked at each report (who holds a lock)


def report_after_s() -> float:
    """``VZT_WAIT_REPORT_S``: seconds a phase may last before it is reported, and between two reports."""
    value = os.environ.get(REPORT_ENV, "")
    if not value:
        return DEFAULT_REPORT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UserError(
            f"{REPORT_ENV}={value!r}: give the seconds a startup phase may wait before it is reported (> 0)"
        )
    return seconds


def duration(seconds: float) -> str:
    """``"2.5 s"``, ``"45 s"``, ``"12 min 5 s"``: a wait as people read it."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    return f"{whole} s" if whole < 120 else f"{whole // 60} min {whole % 60} s"


def _said(waits_on: WaitsOn) -> str:
    if isinstance(waits_on, str):
        return waits_on
    try:
        return waits_on()
    except Exception as err:  # a report must never stop the command it describes
        return f"(could not tell: {type(err).__name__}: {err})"


@dataclass(eq=False)  # phases are told apart by identity: two may have the same name at the same time
class _Phase:
    name: str
    waits_on: WaitsOn
    since: float  # time.time() when it began
    next_report: float  # time.time() when it is reported next
    reported: bool = False


class Watchdog:
    """The phases of one process, a stack (a phase may run inside another: the current one is the innermost), and
    the daemon thread that reports the current one once it has lasted ``report_after`` seconds.

    ``status_file``: where a rank under the launcher (its ``local_rank`` on this node) keeps its phase instead of
    printing (:class:`RankBoard` prints).
    """

    def __init__(self, who: str, report_after: float, status_file: Path | None = None, local_rank: int = 0):
        self.who = who
        self.report_after = report_after
        self.status_file = status_file
        self.local_rank = local_rank
        self._phases: list[_Phase] = []
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        # Status writes in turn, each of the then current phase: a report thread's write that was slow to ask the
        # phase's callable must not land after, and undo, the main thread's write of a phase change.
        self._writing = threading.Lock()

    @contextmanager
    def phase(self, name: str, waits_on: WaitsOn) -> Iterator[Callable[[], None]]:
        """Inside the block this process is in phase ``name``, waiting on ``waits_on``; the block gets a function
        that ends the phase before the block does (when only a callback knows that the wait is over)."""
        entered = _Phase(name, waits_on, time.time(), time.time() + self.report_after)
        with self._changed:
            self._phases.append(entered)
            self._start_thread()
            self._changed.notify()
        self._write_status()

        def end() -> None:
            with self._changed:
                if entered not in self._phases:
                    return
                self._phases.remove(entered)
                self._changed.notify()
            self._write_status()

        try:
            yield end
        finally:
            end()

    def first_of(self, items: Iterable[T], name: str, waits_on: WaitsOn) -> Iterator[T]:
        """``items``, with the wait for the first one in phase ``name`` (the first batch of a data loader)."""
        iterator = iter(items)
        with self.phase(name, waits_on):
            first = next(iterator, _NOTHING)
        if first is not _NOTHING:
            yield first
            yield from iterator

    def report(self, current: _Phase, now: float) -> str:
        """The report line of phase ``current`` at time ``now`` (the first one says how often it comes)."""
        every = "" if current.reported else f" (said every {duration(self.report_after)} while it lasts: {REPORT_ENV})"
        elapsed = duration(now - current.since)
        return f"[wait] {self.who}: {current.name} for {elapsed}, waiting on {_said(current.waits_on)}{every}"

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="vzt-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while True:
            with self._changed:
                current = self._phases[-1] if self._phases else None
                now = time.time()
                if current is None or now < current.next_report:
                    self._changed.wait(None if current is None else current.next_report - now)
                    continue
                current.next_report = now + self.report_after
            if self.status_file is not None:
                self._write_status()  # the launcher reports; the file keeps the callable's answer current
            else:
                print(self.report(current, now), file=sys.stderr, flush=True)
            current.reported = True

    def _write_status(self) -> None:
        if self.status_file is None:
            return
        with self._writing:
            with self._changed:
                current = self._phases[-1] if self._phases else None
            record = {"who": self.who, "local_rank": self.local_rank, "pid": os.getpid()}
            if current is not None:
                record.update(phase=current.name, waits_on=_said(current.waits_on), since=current.since)
            # Not files.atomic_write: it reads the umask by setting it, which is not safe beside other threads.
            tmp = self.status_file.with_name(f".{self.status_file.name}.tmp")
            try:
                tmp.write_text(json.dumps(record))
                os.replace(tmp, self.status_file)
            except OSError:  # the launcher's folder went away: the launcher is ending, and nobody reads it
                tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# The process's watchdog


_process_watchdog: Watchdog | None = None
_process_name = "visionzip_tune"


def name_process(name: str) -> None:
    """What a single process calls itself in its reports (the command: ``eval``, ``generate``); ranks of a process
    group are called ``rank R``."""
    global _process_name
    _process_name = name


def _watchdog() -> Watchdog:
    global _process_watchdog
    if _process_watchdog is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = os.environ.get("RANK")
        who = f"rank {rank} of {world}" if rank is not None and world > 1 else _process_name
        folder = os.environ.get(ERROR_DIR_ENV)
        under_launcher = rank is not None and folder is not None and Path(folder).is_dir()
        status = Path(folder) / f"status-rank{rank}.json" if under_launcher else None
        _process_watchdog = Watchdog(who, report_after_s(), status, int(os.environ.get("LOCAL_RANK", "0")))
    return _process_watchdog


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) has no watchdog thread, and may have been forked while another thread held
    # the watchdog's lock: it starts afresh if it ever names a phase.
    global _process_watchdog
    _process_watchdog = None


os.register_at_fork(after_in_child=_forget_in_child)


@contextmanager
def phase(name: str, waits_on: WaitsOn) -> Iterator[Callable[[], None]]:
    """Inside the block this process is in phase ``name`` (``"loading weights"``), waiting on ``waits_on`` (``"the
    files of data/tiny-llava-demo"``, or a callable saying it at each report); reported if it lasts (module doc).
    The block gets a function that ends the phase early (:meth:`Watchdog.phase`)."""
    with _watchdog().phase(name, waits_on) as end:
        yield end


def first_of(items: Iterable[T], name: str, waits_on: WaitsOn) -> Iterator[T]:
    """``items``, with the wait for the first one in phase ``name`` (:meth:`Watchdog.first_of`)."""
    return _watchdog().first_of(items, name, waits_on)


# ---------------------------------------------------------------------------------------------------------------
# The launcher's view of its ranks


class RankBoard:
    """What the launcher prints about its ``local_ranks`` ranks while they start: every ``report_after`` seconds, one
    line per phase in which ranks have waited longer than that (ranks in the same phase on the same thing share a
    line), from the status files the ranks keep in ``folder``; a rank that has not named a phase yet is named too,
    with what it does until then (``starting``)."""

    def __init__(self, folder: Path, local_ranks: int, report_after: float, starting: str):
        self.folder = folder
        self.local_ranks = local_ranks
        self.report_after = report_after
        self.starting = starting
        self.started = time.time()
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vzt-rank-board", daemon=True)

    def lines(self, now: float) -> list[str]:
        """The report lines at time ``now`` (none when no rank has waited long)."""
        statuses = []
        for path in self.folder.glob(STATUS_GLOB):
            try:
                statuses.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # replaced or being replaced as it was read: the next round reads it
                continue
        waiting: dict[tuple[str, str], list[dict]] = {}
        for status in statuses:
            if "phase" in status and now - status["since"] >= self.report_after:
                waiting.setdefault((status["phase"], status["waits_on"]), []).append(status)
        lines = []
        for (name, waits_on), group in waiting.items():
            who = ", ".join(status["who"] for status in sorted(group, key=lambda s: s["local_rank"]))
            longest = max(now - status["since"] for status in group)
            lines.append(f"[wait] {who}: {name} for {duration(longest)}, waiting on {waits_on}")
        silent = sorted(set(range(self.local_ranks)) - {status["local_rank"] for status in statuses})
        if silent and now - self.started >= self.report_after:
            lines.append(
                f"[wait] local rank(s) {', '.join(map(str, silent))} of {socket.gethostname()}: no phase named "
                f"{duration(now - self.started)} after the launch (still {self.starting}, or stuck there)"
            )
        if lines and not self._reported:
            lines[-1] += f" (said every {duration(self.report_after)} while ranks wait: {REPORT_ENV})"
            self._reported = True
        return lines

    def start(self) -> RankBoard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.report_after):
            for line in self.lines(time.time()):
                print(line, file=sys.stderr, flush=True)
