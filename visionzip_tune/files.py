"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Temporary names start with a dot and carry a marker (``.NAME.tmp-XXXX``, ``.NAME.old-XXXX``), so the leftovers of
a write that was killed can be recognised and removed at the next start (:func:`remove_stale_temps`). Files and
directories end up with the permissions the user's umask gives, like any other file they create (the temporary
ones are created private, as ``tempfile`` does). A write that fails for lack of space or permission becomes a
:class:`UserError` naming the path and the free space (:func:`disk_errors`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from visionzip_tune.errors import UserError

TEMP_MARKERS = (".tmp-", ".old-")
# Write failures the user can fix (space, quota, permissions, a read-only or size-limited filesystem).
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, mode: int) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would have given it (``mode`` minus the umask)."""
    os.chmod(path, mode & ~_umask())


def share_as_created(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions plain ``mkdir``/``open`` would have: some writers (a
    temporary directory, safetensors) create private files, which teammates reading a run could not open."""
    _as_if_created(folder, 0o777)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            _as_if_created(path, 0o777 if path.is_dir() or path.stat().st_mode & 0o111 else 0o666)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Write through the yielded binary file; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        _as_if_created(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill the yielded temporary directory; it then replaces ``path`` (an existing one is moved aside first and
    removed only once the new one is in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    try:
        yield tmp
        share_as_created(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove what killed atomic writes left in ``folder`` (not recursive), only those of ``name`` when given;
    returns what was removed. Call it only where no other process is writing (a run directory whose lock is
    held)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefixes = tuple(f".{name}{marker}" for marker in TEMP_MARKERS) if name else None
    stale = [
        p
        for p in folder.iterdir()
        if (
            p.name.startswith(prefixes)
            if prefixes
            else p.name.startswith(".") and any(m in p.name for m in TEMP_MARKERS)
        )
    ]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@contextmanager
def disk_errors(path: str | Path, what: str) -> Iterator[None]:
    """Turn a write failure the user can fix (no space, quota, permission, read-only or size limit) inside the
    block into a one-paragraph :class:`UserError` naming ``what`` was being written, ``path`` and the free space."""
    try:
        yield
    except Exception as err:
        reason = _fixable_write_failure(err)
        if reason is None:
            raise
        raise UserError(f"could not write {what} to {path}: {reason}; {free_space(path)}") from None


def _fixable_write_failure(err: Exception) -> str | None:
    """Why a write failed, when the user can fix it; None for anything else. torch.save and safetensors report
    such failures as RuntimeError / SafetensorError without an errno, so their messages are read too."""
    if isinstance(err, OSError):
        return (err.strerror or str(err)) if err.errno in _USER_ERRNOS else None
    text = str(err)
    if "PytorchStreamWriter failed writing" in text or "file write failed" in text:
        return "the file could not be written (no space left, a quota or a file size limit)"
    known = ("No space left", "File too large", "Disk quota", "Read-only file system", "Permission denied")
    return next((phrase for phrase in known if phrase.lower() in text.lower()), None)


def free_space(path: str | Path) -> str:
    """``"12.3 GiB free on /mnt/x"`` for the filesystem holding ``path`` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB on the filesystem of {probe}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
