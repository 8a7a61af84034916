"""What this host's ``/proc`` says about the processes behind a lock: whether a recorded process still runs (its pid
and start time: a pid the kernel reused for another process does not count), which processes hold a file open or
work in a directory, what a process runs, and whether other hosts can write to a directory (its filesystem).
Linux only, as ``/proc`` is; elsewhere nothing is known, and callers keep waiting where they cannot tell.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
# Filesystems only this host writes to: a lock there that no process of this host holds has no holder anywhere.
# Anything else (nfs, lustre, gpfs, cifs, fuse mounts, ...) may be shared with other hosts, whose processes /proc
# does not show.
LOCAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "bcachefs", "tmpfs", "ramfs", "overlay"}
)


def start_token(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, field 22 of ``/proc/PID/stat``), None if unknown: with
    the pid it names one process, where a pid alone may have been reused since."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # the fields after the command name, which may hold spaces


def alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs (someone else's too), and, given its ``start`` token, is still that process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    return start is None or start_token(pid) in (start, None)


def users_of(lock: Path) -> list[int]:
    """The processes of this host that have ``lock`` open, or work in its directory (a build's compilers, which a
    killed builder leaves running, work there); none when ``/proc`` cannot tell."""
    lock, folder = lock.resolve(), lock.parent.resolve()
    return sorted(int(entry.name) for entry in PROC.glob("[0-9]*") if {lock, folder} & _paths_used(entry))


def _paths_used(process: Path) -> set[Path]:
    """The working directory and the open files of the process at ``/proc/PID`` (those that can be read: a file
    closed meanwhile, or someone else's process, is left out)."""
    used = set()
    for link in [process / "cwd", *_entries(process / "fd")]:
        try:
            used.add(Path(os.readlink(link)))
        except OSError:
            continue
    return used


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def command_of(pid: int, limit: int = 80) -> str:
    """The command line of ``pid``, cut to ``limit`` characters ("?" when unknown)."""
    try:
        words = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    command = " ".join(word.decode(errors="replace") for word in words if word) or "?"
    return command if len(command) <= limit else command[: limit - 3] + "..."


def filesystem_of(path: Path) -> str | None:
    """The filesystem type holding ``path`` (``ext4``, ``nfs4``, ...) from ``/proc/self/mountinfo``; None if
    unknown."""
    target = str(path.resolve())
    best, kind = "", None
    try:
        lines = (PROC / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields, _, rest = line.partition(" - ")
        mount_point = fields.split()[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, rest.split()[0]
    return kind


def only_this_host_writes(path: Path) -> bool:
    """Whether ``path`` lies on a filesystem of :data:`LOCAL_FILESYSTEMS`."""
    return filesystem_of(path) in LOCAL_FILESYSTEMS
