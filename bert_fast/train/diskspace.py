"""A full disk, said in one line: which path, how much space it needed, how much was free.

torch.save reports a full disk as `RuntimeError: [enforce fail at inline_container.cc:...]
unexpected pos ...` (no errno), and a plain write as `OSError: [Errno 28]` without the file's
name; the run's own writes go through `write_error`, which names both.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


class DiskFullError(OSError):
    """A write that found no space; the message names the path and the sizes."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged process may still write on the file system holding `path` (its
    nearest existing folder); None where statvfs fails."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def size_text(n: int | None, note: str = "") -> str:
    """'81.7 MB (81,712,345 bytes, <note>)', '77 bytes (<note>)'."""
    if n is None:
        text, details = "an unknown amount", []
    elif n < 1000:
        text, details = f"{n} bytes", []
    else:
        unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= s)
        text, details = f"{n / scale:.1f} {unit}", [f"{n:,} bytes"]
    details += [note] if note else []
    return f"{text} ({', '.join(details)})" if details else text


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` or what it came from is a full disk or an exceeded quota."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL:
            return True
        if any(text in str(err) for text in _FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(path: str | os.PathLike, needed: int | None, what: str, free: int | None = None,
                      basis: str = "", fix: str = "free space there or write elsewhere") -> str:
    """'no space left on device writing <path>: <what> needs <needed> (<basis>), its file system
    has <free> free; <fix>'. free: measured when the write failed (default: now)."""
    free = free_bytes(path) if free is None else free
    return (f"no space left on device writing {path}: {what} needs {size_text(needed, basis)}, its file "
            f"system has {size_text(free)} free; {fix}")


def write_error(path: str | os.PathLike, err: OSError, needed: int | None, what: str) -> OSError:
    """The error to raise for a failed write of `path`: a DiskFullError naming the sizes for a full
    disk, else an OSError naming the path."""
    if is_disk_full(err):
        return DiskFullError(disk_full_message(path, needed, what))
    return OSError(err.errno, f"writing {path} failed: {err.strerror or err}")
