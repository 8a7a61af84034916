"""The lock a killed C++ extension build leaves, and the wait for one a live build holds.

torch JIT-builds a C++ extension (DeepSpeed's CPU ops) in ``TORCH_EXTENSIONS_DIR/<op>/`` while holding
``<op>/lock``: a file it creates exclusively and removes when the build ends. Every other process that loads the op
meanwhile waits for the file to go (``torch.utils.file_baton.FileBaton.wait``: it polls, silently and forever). A
build killed with SIGKILL (the OOM killer, a node failure, a scheduler's kill after its grace period) never removes
it, and every later run then waits forever. torch writes no owner into the file; /proc tells who holds it: the
process that created it keeps it open for the whole build, and the compilers its ninja runs work in that directory
(they keep running when the builder is killed).

:func:`clear_build_locks`, run before DeepSpeed initialises: a lock that no process holds is removed with a one-line
warning naming it (on a filesystem other hosts may write to, only once nothing in its directory has changed for
:data:`BUILD_QUIET_S` seconds, longer than a build step takes, since /proc does not show other hosts' builds); a
lock a live build holds is waited for, and the watchdog says every ``VZT_WAIT_REPORT_S`` seconds who holds it and
for how long it has waited.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch.utils.cpp_extension import get_default_build_root

from visionzip_tune import watchdog
from visionzip_tune.training.processes import command_of, filesystem_of, only_this_host_writes, users_of

LOCK_NAME = "lock"  # torch's name for it (torch.utils.cpp_extension._jit_compile)
BUILD_QUIET_S = 600.0  # a compile step writes its object file at its end: allow it well over its minute or two
POLL_S = 1.0
_HOLDERS_SHOWN = 3  # a build is a builder, its ninja and a compiler or two per source: the first few say enough
_CHECK_GUARD = ".visionzip_tune-lock-check"  # one checker at a time per extensions directory (see _one_checker)


def extensions_root() -> Path:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR``, else its default root."""
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(folder) if folder else Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """The build locks under ``root``: ``<op>/lock``, or ``<python>_<accelerator>/<op>/lock`` under torch's default
    root."""
    return sorted([*root.glob(f"*/{LOCK_NAME}"), *root.glob(f"*/*/{LOCK_NAME}")])


@dataclass(frozen=True)
class LockState:
    """Who holds a build lock, as far as this host can tell."""

    holders: list[int]  # processes of this host that build under it
    quiet_s: float  # seconds since anything in its directory changed
    shared: bool  # its directory is on a filesystem other hosts may write to

    @property
    def stale(self) -> bool:
        """Left by a killed build: nobody can be building under it any more."""
        return not self.holders and (not self.shared or self.quiet_s >= BUILD_QUIET_S)


def lock_state(lock: Path) -> LockState | None:
    """The state of ``lock``; None when it is gone (the build ended)."""
    try:
        changed = max(entry.stat().st_mtime for entry in [lock.parent, *lock.parent.iterdir()])
    except FileNotFoundError:  # a file went as it was read: ask again next time
        changed = time.time()
    if not lock.exists():
        return None
    return LockState(users_of(lock), time.time() - changed, not only_this_host_writes(lock.parent))


def describe(lock: Path, state: LockState | None) -> str:
    """What a process waiting for ``lock`` waits on, in one sentence."""
    if state is None:
        return f"the build lock {lock}, just released"
    if state.holders:
        shown = [f"{pid} ({command_of(pid, limit=40)})" for pid in state.holders[:_HOLDERS_SHOWN]]
        more = len(state.holders) - _HOLDERS_SHOWN
        holders = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        return f"the build lock {lock}, held by the live build of process(es) {holders}"
    return (
        f"the build lock {lock}: no process of this host holds it, but {lock.parent} is on a {filesystem_of(lock)} "
        f"filesystem that other hosts may share, where a build may still run; it counts as left by a killed build "
        f"once nothing there has changed for {watchdog.duration(BUILD_QUIET_S)} (last change "
        f"{watchdog.duration(state.quiet_s)} ago)"
    )


def clear_build_locks(root: Path | None = None) -> list[Path]:
    """Before DeepSpeed loads its ops: remove every build lock under ``root`` (default :func:`extensions_root`)
    that a killed build left, after waiting for those a live build holds (module doc); returns the removed ones."""
    root = extensions_root() if root is None else root
    return [lock for lock in build_locks(root) if _wait_until_free(lock)] if root.is_dir() else []


def _wait_until_free(lock: Path) -> bool:
    """Wait while a live build holds ``lock``, then remove it if it is stale; whether it was removed."""
    started = time.time()
    state = lock_state(lock)
    if state is not None and not state.stale:
        print(f"[ops] waiting for {describe(lock, state)}", file=sys.stderr, flush=True)
    with watchdog.phase("waiting for another process's C++ op build", lambda: describe(lock, lock_state(lock))):
        while True:
            with _one_checker(lock.parent.parent):
                state = lock_state(lock)
                if state is None:
                    return False
                if state.stale:
                    lock.unlink(missing_ok=True)
                    break
            time.sleep(POLL_S)
    waited = f" after waiting {watchdog.duration(time.time() - started)}" if time.time() - started >= POLL_S else ""
    print(
        f"[ops] warning: removed the stale build lock {lock}{waited}: no live process holds it (a build was killed "
        "there); the op is built again",
        file=sys.stderr,
        flush=True,
    )
    return True


@contextmanager
def _one_checker(folder: Path) -> Iterator[None]:
    """One process at a time judges and removes the locks in ``folder``: otherwise a rank could remove, as stale,
    the lock another rank took for a fresh build a moment after both found the old one stale. (A flock: the kernel
    releases it when its holder dies.)"""
    with open(folder / _CHECK_GUARD, "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield
