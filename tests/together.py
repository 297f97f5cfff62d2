"""Runs independent calls at the same time, each in a thread of its own.

The end-to-end tests start `pretrain.py` subprocesses one thread each (train.threads=1 or
OMP_NUM_THREADS=1) and CI has two cores, so two runs that do not depend on each other finish in
the time of one. A call's exception (a failed assertion) is raised once every call has returned.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def run_together(*calls: Callable[[], T]) -> list[T]:
    """The calls' results, in the order given."""
    if not calls:
        raise ValueError("run_together needs at least one call")
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="together") as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]
