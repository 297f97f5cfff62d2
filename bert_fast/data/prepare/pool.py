"""prepare's worker pool: runs ChunkTokenizer over the chunks, in this process or in `workers`
processes, and hands the results back in input order with a bounded number in flight."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from bert_fast.data.prepare.chunk import ChunkTokenizer

_WORKER: ChunkTokenizer | None = None  # in a pool process


def _start_worker(*args) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    _WORKER = ChunkTokenizer(*args)


def _work(chunk):
    return _WORKER(chunk)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(workers: int, left_bytes: int, chunk_bytes: int) -> int:
    """`workers` (0: all cores), but no more than there are chunks of `chunk_bytes` left."""
    return max(1, min(workers or cores(), -(-left_bytes // chunk_bytes)))


@contextlib.contextmanager
def tokenized(chunks, workers: int, args):
    """An iterator over (chunk, ChunkTokenizer(*args)(chunk)) in input order: in this process, or
    from a pool of `workers` processes with at most two chunks per worker in flight (so results
    never pile up, whatever the corpus size)."""
    if workers == 1:
        job = ChunkTokenizer(*args)
        yield ((chunk, job(chunk)) for chunk in chunks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)  # fork: no re-imports
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=args)

    def result(chunk, future):
        try:
            return chunk, future.result()
        except BrokenProcessPool as err:
            raise RuntimeError("a prepare worker process died (killed for lack of memory?); the complete "
                               "shards are kept: run prepare again to resume") from err

    def results():
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_work, chunk)))
            if len(pending) >= 2 * workers:
                yield result(*pending.popleft())
        while pending:
            yield result(*pending.popleft())

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
