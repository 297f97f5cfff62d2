"""Checksums of checkpoint files: a sha256 of every 64 MiB block of every file, whatever its size.

One sha256 runs on one core (about 0.75-1.4 GB/s here), slower than a save writes to the page
cache; blocks are hashed in parallel by a few threads (hashlib releases the GIL), so a rank hashes
the bytes of a file while it writes them (`Hasher.writer`, for DeepSpeed's torch.save) and a
resume verifies a checkpoint at the speed of several cores. A file of one block (up to 64 MiB)
gets the plain sha256 of the file, as `sha256sum` prints it. A mismatch names the bytes that
differ.
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
    """Hashes files in background threads: as they are written through `writer()`, or once written
    (`submit`); `digests()` waits for them. Use as a context manager: leaving it on an error
    cancels what has not started."""

    def __init__(self, workers: int | None = None, block: int = BLOCK):
        self.block = block
        self._pool = ThreadPoolExecutor(max_workers=workers or threads(), thread_name_prefix="sha256")
        self._files: dict[Path, tuple[int, list[Future]]] = {}
        self._written: dict[Path, dict] = {}

    def writer(self, path: str | os.PathLike) -> HashingWriter:
        """`path` opened for writing (a new file), hashed as its bytes go through."""
        return HashingWriter(Path(os.path.abspath(path)), self)

    def submit(self, path: str | os.PathLike) -> None:
        """Starts hashing `path`, which its writer has closed (once; a second submit, or one of a
        file written through `writer()`, is a no-op). Digests are keyed by absolute path."""
        path = Path(os.path.abspath(path))
        if path in self._files or path in self._written:
            return
        size = path.stat().st_size
        self._files[path] = (size, [self._pool.submit(_block_sha256, path, i, self.block)
                                    for i in range(block_count(size, self.block))])

    def digests(self) -> dict[Path, dict]:
        """{path: {"size": bytes, "sha256": [hex per block]}} of every file handed in; refuses one
        whose size changed since."""
        out = dict(self._written)
        for path, (size, futures) in self._files.items():
            out[path] = {"size": size, "sha256": [f.result() for f in futures]}
        for path, entry in out.items():
            now = path.stat().st_size
            if now != entry["size"]:
                raise RuntimeError(f"{path} changed after it was hashed ({entry['size']} bytes, then {now})")
        return out

    def close(self, wait: bool = True) -> None:
        """Cancels what has not started; `wait` for the threads (idle once `digests()` returned)
        so none is alive when DataLoader workers are forked next; on an error, do not wait."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> Hasher:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)


class HashingWriter:
    """A new binary file whose bytes are hashed, block by block, as they are written: a large
    write is handed to the hasher's threads, one piece per block, while this thread writes it,
    and returns once both are done (torch.save passes views of tensor memory, which must not be
    read after the call). Sequential writes only: no seek, no fileno (torch.save then writes
    everything through `write`, the same bytes as to a path in its default format)."""

    _INLINE = 1 << 20  # smaller writes (pickle opcodes, headers) are hashed in this thread

    def __init__(self, path: Path, hasher: Hasher):
        self.path, self._hasher, self._block = path, hasher, hasher.block
        self._file = open(path, "wb")
        self._blocks: list = []  # one running sha256 per block reached
        self._pos = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        pieces, offset = [], 0
        while offset < len(view):
            index = (self._pos + offset) // self._block
            take = min(len(view) - offset, (index + 1) * self._block - self._pos - offset)
            while len(self._blocks) <= index:
                self._blocks.append(hashlib.sha256())
            pieces.append((self._blocks[index], view[offset:offset + take]))
            offset += take
        if len(view) < self._INLINE:
            for digest, piece in pieces:
                digest.update(piece)
            written = self._file.write(view)
        else:
            jobs = [self._hasher._pool.submit(digest.update, piece) for digest, piece in pieces]
            try:
                written = self._file.write(view)
            finally:
                for job in jobs:
                    job.result()
        self._pos += len(view)
        return written

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        digests = [d.hexdigest() for d in self._blocks] or [hashlib.sha256().hexdigest()]
        self._hasher._written[self.path] = {"size": self._pos, "sha256": digests}

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # a failed write: no digest
            self._file.close()


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
