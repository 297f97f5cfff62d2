"""Atomic file writes: write to a temporary name in the same folder, fsync, rename. A crash
mid-write leaves the old file (or nothing), never a truncated one."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path


def plain_file_mode() -> int:
    """The mode a plain open() gives a new file: 0666 less the umask (0644 under the usual 022).
    Read each call (the umask can only be read by setting it), so a changed umask is honoured."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path next to `path`; on success it is fsynced and renamed to `path`,
    with the mode a plain write gives it (mkstemp makes its files private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # After the writer: some (safetensors) replace the file they are given with a new one.
        os.chmod(tmp, plain_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike):
    """Holds an exclusive lock on the file `lock` (created if absent) for the block, so processes
    that build the same output take turns: the ranks of one launch all prepare the cached corpus
    on a cold cache, and one rank must not read files another is still writing. A POSIX lock:
    this process's alone, so workers it forks neither hold it nor keep it after it dies."""
    lock = Path(lock)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:  # a folder this process cannot write, it will not write to: read it as is
        fd = None
    try:
        if fd is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
