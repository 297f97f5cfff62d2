"""Spawned CPU ranks for the multi-process gloo tests: the environment the DeepSpeed launcher would
set, the trainer's own init_distributed, results recorded as they are computed, and a one-line
account of a rank that died, taken from its own log (a native abort included), for the report."""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from bert_fast.train.engine import free_port, init_distributed, shutdown


class RankResults(dict):
    """A rank's results, rewritten to disk (temporary name, then rename) at every assignment, so a
    crash leaves what was finished and the report can say how far the rank got."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self))
        os.replace(tmp, self.path)


@dataclass
class Launch:
    port: int
    exitcodes: list  # per rank: 0, a positive code, minus a signal number, or None (killed at the deadline)
    results: list  # per rank: the dict it recorded, whole or up to where it stopped
    logs: list  # per rank: its stdout and stderr
    returned: list  # per rank: whether its worker returned

    @property
    def failed(self) -> list[int]:
        """The ranks that did not finish cleanly (finishing: the worker returned, then exit 0)."""
        return [r for r, code in enumerate(self.exitcodes) if code != 0 or not self.returned[r]]

    def failures(self) -> list[str]:
        """One line per failed rank: how it ended, after which result, and why."""
        return [_describe(r, self.exitcodes[r], self.results[r], self.logs[r], self.returned[r]) for r in self.failed]

    def check_exits(self) -> None:
        """Fails the test, first line saying which rank died and why, unless every rank finished."""
        if self.failed:
            import pytest

            tails = "\n".join(f"--- rank {r}'s log, last lines ---\n" + "\n".join(self.logs[r].splitlines()[-40:])
                               for r in self.failed)
            pytest.fail(" || ".join(self.failures()) + "\n" + tails, pytrace=False)

    def finished_results(self) -> list:
        """Every rank's results, once every worker returned; otherwise check_exits' failure."""
        if not all(self.returned):
            self.check_exits()
        return self.results


# What a dying process says: a C++ terminate/what(), faulthandler's banner, a Python error, and
# pretrain.py's and DeepSpeed's launcher's own account of a failed run.
_LAST_WORDS = re.compile(r"terminate called|what\(\)|Fatal Python error|Error:|Exception:|Assertion"
                         r"|pretrain\.py: (error|training stopped)|exits with return code")


def last_words(text: str, n: int) -> str:
    """The last `n` lines of `text` that say why a process failed, joined on one line."""
    return " | ".join([line.strip() for line in text.splitlines() if _LAST_WORDS.search(line)][-n:])


def _describe(rank: int, code, results: dict, log: str, returned: bool) -> str:
    if code == 0 and not returned:
        how = "exited 0 before its worker returned"
    elif code is None:
        how = "was still running and was killed (the deadline, or a peer had failed)"
    elif code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
    else:
        how = f"exited with code {code}"
    last = list(results)[-1] if results else None
    lines = log.splitlines()
    # The innermost Python frame faulthandler printed (most recent call first).
    heads = [i for i, line in enumerate(lines[:-1]) if re.match(r"(Current )?[Tt]hread 0x", line)]
    heads.sort(key=lambda i: not lines[i].startswith("Current"))  # the crashing thread, if it is Python's
    frame = lines[heads[0] + 1].strip() if heads else None
    where = f"; innermost frame: {frame}" if frame else ""
    return f"rank {rank} {how} after recording {last!r}: " + (last_words(log, 3) or "nothing in its log") + where


def _rank_main(worker, rank: int, world: int, port: int, folder: str, args: tuple) -> None:
    folder = Path(folder)
    log = open(folder / f"rank{rank}.log", "w", buffering=1)
    for fd in (1, 2):  # C++ (gloo, DeepSpeed ops, abort messages) writes to the descriptors
        os.dup2(log.fileno(), fd)
    sys.stdout = sys.stderr = log
    faulthandler.enable(file=log, all_threads=True)  # a native crash prints each thread's stack
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed()
    worker(rank, RankResults(folder / f"result{rank}.json"), *args)
    (folder / f"rank{rank}.returned").touch()
    # Engines are freed while the group is still up (their destructors may talk to it), then every
    # rank leaves together. The rank then ends as a forked multiprocessing child does, without the
    # interpreter's teardown of DeepSpeed's and gloo's globals: the test is of the work above.
    gc.collect()
    torch.distributed.barrier()
    shutdown()
    log.flush()
    os._exit(0)


def run_ranks(worker, world: int, folder: Path, args: tuple = (), timeout: float = 900.0,
              grace: float = 30.0) -> Launch:
    """Runs worker(rank, results, *args) on `world` spawned ranks of one gloo group on this machine
    and waits for all of them. `results` is a RankResults. A rank that fails does not stop the
    others at once: they get `grace` seconds to finish or fail on their own (the first failure is
    not always the cause), then are killed, as are ranks still running after `timeout`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(worker, rank, world, port, str(folder), args), daemon=False)
             for rank in range(world)]
    codes = []
    try:
        # CPU ranks on gloo even on a GPU machine: the children see no CUDA device (they read the
        # variable when torch is imported, while the worker is unpickled, so it is set here).
        with mock.patch.dict(os.environ, CUDA_VISIBLE_DEVICES=""):
            for p in procs:
                p.start()
        deadline, failed_at = time.monotonic() + timeout, None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                break
            time.sleep(0.2)
        for p in procs:
            p.join(0)
            codes.append(p.exitcode)  # None: still running, killed below
    finally:  # also when the wait is interrupted: no rank outlives the test
        for p in procs:
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join()
    results = []
    for rank in range(world):
        path = folder / f"result{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    logs = [(folder / f"rank{rank}.log").read_text(errors="replace") if (folder / f"rank{rank}.log").exists()
            else "" for rank in range(world)]
    returned = [(folder / f"rank{rank}.returned").exists() for rank in range(world)]
    return Launch(port, codes, results, logs, returned)
