"""Checksums of checkpoint files: a sha256 of every 64 MiB block of every file, whatever its size.

One sha256 runs on one core (about 0.75-1.4 GB/s here), slower than a save writes to the page
cache; blocks are hashed in parallel by a few threads (hashlib releases the GIL), so a rank hashes
a file it has written while it writes the next one and fsyncs, and a resume verifies a checkpoint
at the speed of several cores. A file of one block (up to 64 MiB) gets the plain sha256 of the
file, as `sha256sum` prints it. A mismatch names the bytes that differ.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

BLOCK = 64 << 20  # bytes per digest; recorded in the manifest, so it may change later
_READ = 4 << 20   # bytes per read inside a block: memory stays threads x 4 MiB


def threads() -> int:
    """Hashing threads: every core up to 4 (a save pauses training, so the cores are free)."""
    return max(1, min(4, os.cpu_count() or 1))


def block_count(size: int, block: int = BLOCK) -> int:
    """Digests of a file of `size` bytes (an empty file has one, the sha256 of nothing)."""
    return max(1, -(-size // block))


def _block_sha256(path: Path, index: int, block: int) -> str:
    digest, remaining = hashlib.sha256(), block
    with open(path, "rb", buffering=0) as f:
        f.seek(index * block)
        while remaining:
            data = f.read(min(_READ, remaining))
            if not data:
                break
            digest.update(data)
            remaining -= len(data)
    return digest.hexdigest()


class Hasher:
    """Hashes files in background threads as they are handed in; `digests()` waits for them.

    A file must be complete when submitted (closed by its writer); `digests()` refuses one whose
    size changed since. Use as a context manager: leaving it cancels what is not done."""

    def __init__(self, workers: int | None = None, block: int = BLOCK):
        self.block = block
        self._pool = ThreadPoolExecutor(max_workers=workers or threads(), thread_name_prefix="sha256")
        self._files: dict[Path, tuple[int, list[Future]]] = {}

    def submit(self, path: str | os.PathLike) -> None:
        """Starts hashing `path` (once; a second submit of the same file is a no-op). Its
        digests are keyed by its absolute path."""
        path = Path(os.path.abspath(path))
        if path in self._files:
            return
        size = path.stat().st_size
        self._files[path] = (size, [self._pool.submit(_block_sha256, path, i, self.block)
                                    for i in range(block_count(size, self.block))])

    def digests(self) -> dict[Path, dict]:
        """{path: {"size": bytes, "sha256": [hex per block]}} of every submitted file."""
        out = {}
        for path, (size, futures) in self._files.items():
            digests = [f.result() for f in futures]
            now = path.stat().st_size
            if now != size:
                raise RuntimeError(f"{path} changed while it was hashed ({size} bytes, then {now})")
            out[path] = {"size": size, "sha256": digests}
        return out

    def close(self, wait: bool = True) -> None:
        """Cancels what has not started; `wait` for the threads (idle once `digests()` returned)
        so none is alive when DataLoader workers are forked next; on an error, do not wait."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> Hasher:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)


def digest_files(paths: list[Path], block: int = BLOCK) -> dict[Path, dict]:
    """{path: {"size", "sha256"}} of `paths`, hashed in parallel."""
    with Hasher(block=block) as hasher:
        for path in paths:
            hasher.submit(path)
        return hasher.digests()


def mismatches(folder: Path, entries: dict[str, list[str]], block: int) -> list[str]:
    """The blocks of files under `folder` whose sha256 is not the recorded one, as
    '<file> bytes A-B' (every block hashed in parallel); [] when all match. entries: relative
    path -> its recorded digests (sizes already checked)."""
    with ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="sha256") as pool:
        jobs = [(rel, i, expected, pool.submit(_block_sha256, folder / rel, i, block))
                for rel, digests in entries.items() for i, expected in enumerate(digests)]
        bad = []
        for rel, i, expected, job in jobs:
            if job.result() != expected:
                size = (folder / rel).stat().st_size
                bad.append(f"{rel} bytes {i * block}-{min(size, (i + 1) * block) - 1}")
        return bad
