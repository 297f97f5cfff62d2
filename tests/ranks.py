"""One CPU rank of a 2-process gloo test launched with torch.multiprocessing.spawn: the environment
the DeepSpeed launcher would set, then the trainer's own init_distributed."""

from __future__ import annotations

import atexit
import faulthandler
import os

import torch

from bert_fast.train.engine import init_distributed, shutdown


def start_cpu_rank(rank: int, world: int, port: int) -> None:
    """Joins the process group as `rank` of `world` on this machine; leaves it when the rank exits,
    passed or failed, so no peer is torn down mid-collective."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faulthandler.enable()  # a native crash prints each thread's Python stack into the test's stderr
    init_distributed()
    atexit.register(shutdown)
