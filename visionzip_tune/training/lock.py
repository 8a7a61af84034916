"""One run per run directory: a lock file naming the process that holds it.

``RUN_DIR/.lock`` holds ``{"host", "pid", "start", "started"}`` and is created exclusively (``O_EXCL``), so of two
runs started into one directory exactly one gets it; the other is refused at once, naming the holder. The holder
touches the file as it trains (:meth:`RunLock.heartbeat`). A lock is stale -- taken over with a warning -- when its
process is gone: on this host, when no process has its pid, or the one that has it started at another time than
the recorded ``start`` (the kernel reused the pid of a killed run); from another host (a shared filesystem), when
the file has not been touched for :data:`STALE_AFTER_S` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from visionzip_tune.errors import UserError
from visionzip_tune.training.processes import alive, start_token

LOCK_FILE = ".lock"
STALE_AFTER_S = 1800  # longer than any step, evaluation or checkpoint a run makes between two heartbeats


class RunLock:
    """The lock of ``run_dir``, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self.made_dir = False  # the lock created the run directory: release removes it again if left empty

    def _holder(self) -> dict | None:
        """The recorded holder, or None when the file is gone; a torn file reads as an unknown holder."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            return not isinstance(holder.get("pid"), int) or not alive(holder["pid"], holder.get("start"))
        try:
            return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`UserError` naming the live process that holds it."""
        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": start_token(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(2):  # a stale lock is removed once, then taken like a free one
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                if not self._is_stale(holder):
                    raise UserError(
                        f"output.dir {self.path.parent} is in use by another run (process {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}; lock file {self.path}). Wait for it "
                        "to finish or stop it, or choose another output.dir."
                    ) from None
                print(
                    f"[train] warning: taking over the stale lock of {self.path.parent}: process "
                    f"{holder.get('pid')} on {holder.get('host')} is gone",
                    file=sys.stderr,
                    flush=True,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            return self
        raise UserError(f"could not take the lock {self.path}: another process keeps creating it")

    def heartbeat(self) -> None:
        """Show other hosts that the holder is alive (the file's mtime)."""
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        """Drop the lock; a run directory the lock created and nothing else filled goes too (a run refused at its
        first check leaves nothing behind)."""
        if not self.held:
            return
        self.path.unlink(missing_ok=True)
        self.held = False
        if self.made_dir and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()
