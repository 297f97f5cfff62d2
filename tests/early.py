"""Long runs that tests only read once they are done, started as soon as the session's tests are
collected, in background threads at a low CPU priority.

Most of the suite keeps one of CI's two cores busy (the Triton interpreter, small eager models,
one subprocess at a time), so a minute of `pretrain.py` that a test module reads later costs no
wall time when it runs beside them instead of in its module's turn. `@early.job` turns a function
`fn(folder, threads)` into a session fixture of the same name: tests take its result as they take
any fixture's, and the function's own assertions fail them as a fixture's would. Jobs are
started (tests/conftest.py) when a selected test uses their fixture and tests of other modules
are selected too (beside which to run), not for --collect-only, in the order the tests will first
ask for them, two at a time. A fixture whose job was not started runs it when first asked, in the
test's own turn, as an ordinary fixture does.

A job started early runs in a thread at nice 10, which every thread and process it starts
inherits (Linux keeps a nice value per thread): the tests in their turn keep the CPU whenever they
want it. `threads` is then 1, and 0 (the default: every core) for a job run in its turn; a job
passes it on (`train.threads`, OMP_NUM_THREADS): an early job is for an idle core, and a niced
thread of a multi-threaded op would hold back its peers. Jobs start their subprocesses through
`run`: those still running when the session ends (a failure under -x, an interrupt) are killed
with their process group, and jobs not yet started are dropped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest

NICENESS = 10
WORKERS = 2
# Started before every other job, whatever the order of first use, and finished before any other
# starts (their runs load what it builds, and a run killed while building would leave torch's build
# lock behind): short, and many tests wait on it.
FIRST = ("deepspeed_shm_op",)
# A run's time limit is stretched this much in a job started early: at nice 10 it gets a tenth of a
# core while the tests' own thread keeps both busy (two ranks, two runs at once).
NICED_TIMEOUT = 5


class Stopped(Exception):
    """The session ended before this job could run."""


@dataclass
class Times:
    """When a job started early was queued, ran, finished, first asked for and answered: seconds
    since the session began, None until it happens (Jobs.timeline)."""
    queued: float
    started: float | None = None
    finished: float | None = None
    asked: float | None = None
    answered: float | None = None


class Jobs:
    def __init__(self, workers: int = WORKERS):
        self.workers = workers
        self.jobs: dict[str, Callable[[Path, int], object]] = {}
        self.futures: dict[str, Future] = {}
        self.processes: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.stopping = False
        self.origin = time.monotonic()
        self.times: dict[str, Times] = {}
        # The environment and folder the session's tests were collected in: what jobs' runs get,
        # whatever a test running meanwhile sets (monkeypatch.setenv, chdir).
        self.environ: dict[str, str] | None = None
        self.cwd: str | None = None
        self.local = threading.local()  # .early: this thread runs a job started early

    def job(self, fn: Callable[[Path, int], object]):
        """A session fixture named after `fn`: `fn(folder, threads)`, started early when a selected
        test uses it."""
        name = fn.__name__
        if self.jobs.get(name, fn) is not fn:
            raise ValueError(f"two early jobs named {name}")
        self.jobs[name] = fn

        def fixture(tmp_path_factory):
            return self.result(name, tmp_path_factory)

        fixture.__doc__ = fn.__doc__
        return pytest.fixture(scope="session", name=name)(fixture)

    def result(self, name: str, tmp_path_factory):
        """The job's result, waiting for it if it was started, running it now otherwise."""
        future = self.futures.get(name)
        if future is None:
            return self.jobs[name](tmp_path_factory.mktemp(name), 0)
        times = self.times[name]
        times.asked = self._now()
        try:
            return future.result()
        finally:
            times.answered = self._now()

    def start(self, session) -> list[str]:
        """Starts the jobs the session's selected tests use, in the order of their first use;
        returns their names."""
        option = session.config.option
        if option.collectonly or getattr(option, "setupplan", False) or getattr(option, "showfixtures", False):
            return []
        from _pytest.skipping import evaluate_skip_marks  # skip and skipif, as pytest will decide them

        first_use: dict[str, int] = {}
        users: dict[str, set] = {}
        items = [item for item in session.items if evaluate_skip_marks(item) is None]
        for index, item in enumerate(items):
            for name in getattr(item, "fixturenames", ()):
                if name in self.jobs and name not in self.futures:
                    first_use.setdefault(name, index)
                    users.setdefault(name, set()).add(item.path)
        modules = {item.path for item in items}
        names = sorted((name for name in first_use if modules - users[name]),
                       key=lambda name: (name not in FIRST, first_use[name]))
        if names:
            self.environ, self.cwd = dict(os.environ), os.getcwd()
        for name in names:
            self.begin(name, session.config._tmp_path_factory)  # what the tmp_path_factory fixture returns
        return names

    def begin(self, name: str, tmp_path_factory) -> Future:
        """Starts the job now (queued behind those started before it) unless it was started; for a
        module that runs a job beside its own tests when the session did not start it earlier."""
        if name not in self.futures:
            self.pool = self.pool or ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="early")
            self.times[name] = Times(self._now())
            self.futures[name] = self.pool.submit(self._run_job, name, tmp_path_factory.mktemp(name))
        return self.futures[name]

    def _now(self) -> float:
        return time.monotonic() - self.origin

    def _run_job(self, name: str, folder: Path):
        if name not in FIRST:
            for first in FIRST:
                if first in self.futures:
                    wait([self.futures[first]])  # its failure is its own fixture's to report
        if self.stopping:
            raise Stopped(name)
        if name not in FIRST and os.getpriority(os.PRIO_PROCESS, 0) < NICENESS:
            os.setpriority(os.PRIO_PROCESS, 0, NICENESS)  # this thread (Linux), and all it starts
        self.local.early = True
        self.times[name].started = self._now()
        try:
            return self.jobs[name](folder, 1)
        finally:
            self.times[name].finished = self._now()

    def timeline(self) -> list[str]:
        """One line per job started early: when it was queued, ran and finished, and how long a
        test waited for it (seconds since the session began), to see what holds the suite up."""
        def at(t):
            return "-" if t is None else f"{t:.0f}"

        lines = []
        for name, t in sorted(self.times.items(), key=lambda item: item[1].queued):
            waited = "-" if t.asked is None or t.answered is None else f"{t.answered - t.asked:.1f}"
            ran = "-" if t.started is None or t.finished is None else f"{t.finished - t.started:.0f}"
            lines.append(f"{name:<30} queued {at(t.queued):>5}  ran {at(t.started):>5}-{at(t.finished):<5} "
                         f"({ran:>4} s)  first asked {at(t.asked):>5}  waited {waited:>5} s")
        return lines

    def env(self) -> dict[str, str]:
        """A copy of the environment for a job's run: the session's at collection when jobs were
        started then, else this process's now."""
        return dict(os.environ if self.environ is None else self.environ)

    def timeout(self, seconds: float | None) -> float | None:
        """A run's time limit, stretched NICED_TIMEOUT times in a job started early."""
        return seconds * NICED_TIMEOUT if seconds is not None and getattr(self.local, "early", False) else seconds

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen in a process group of its own that stop() kills if the session ends
        first; env and cwd default to the session's (env())."""
        kwargs.setdefault("env", self.env())
        if self.cwd is not None:
            kwargs.setdefault("cwd", self.cwd)
        with self.lock:
            if self.stopping:
                raise Stopped(" ".join(map(str, args[:3])))
            self.processes = {p for p in self.processes if p.poll() is None}
            proc = subprocess.Popen(args, start_new_session=True, **kwargs)
            self.processes.add(proc)
        return proc

    def run(self, args: list[str], *, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run for jobs through popen, text output captured; `timeout` as timeout()
        stretches it."""
        timeout = self.timeout(timeout)
        proc = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{args[:4]} still running after {timeout} s:\n{stderr[-3000:]}") from None
        finally:
            with self.lock:
                self.processes.discard(proc)
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)

    def stop(self) -> None:
        """Drops the jobs not started, kills the subprocesses of the running ones, waits for their
        threads."""
        with self.lock:
            self.stopping = True
            for proc in self.processes:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def report(module: str, function: str, *args, path: Path | None = None) -> object:
    """`module.function(*args)` (JSON in, JSON out) in a fresh interpreter started through `run`,
    `path` (a folder such as bench/) first on its sys.path: for jobs that compile (the AOT reports),
    which in a thread of this process would hold the GIL through Triton's compiler passes and stall
    the tests' own thread."""
    code = (f"import json, sys; sys.path[:0] = json.loads(sys.argv[2]); from {module} import {function} as f; "
            f"print(json.dumps(f(*json.loads(sys.argv[1]))))")
    done = run([sys.executable, "-c", code, json.dumps(list(args)), json.dumps([] if path is None else [str(path)])])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def each(threads: int, *calls: Callable[[], object]) -> list:
    """The calls' results, in order: one after another in a job started early (threads 1: one core),
    at the same time in a test's own turn (tests/together.py)."""
    from together import run_together

    return [call() for call in calls] if threads == 1 else run_together(*calls)


_SESSION = Jobs()
job, run, popen, start, begin, stop, timeline = (_SESSION.job, _SESSION.run, _SESSION.popen, _SESSION.start,
                                                 _SESSION.begin, _SESSION.stop, _SESSION.timeline)
environ, timeout = _SESSION.env, _SESSION.timeout
