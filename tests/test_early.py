"""tests/early.py: a job starts at collection when a selected test uses it and other modules'
tests are selected, in the order of first use, on one thread in a niced thread (its subprocesses
niced too), and its fixture waits for it; an unused job, one with nothing beside it or a
collect-only session's is not started, and runs when asked, on every core, not niced; stopping
kills a running job's subprocess and drops the jobs queued; `each` runs calls one after another
in an early job and at once otherwise; FIRST jobs are queued first; the timeline shows each job;
`report` returns a function's JSON result from another interpreter; skipif counts as skip; runs get
the environment and folder of the session's start, a job's time limits are stretched, its
processes are killed at the end; other jobs wait for the FIRST ones."""

import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import early
import pytest


def session(tmp_path_factory, *fixture_lists, collectonly=False, skipped=(), skipped_if=(), modules=None):
    """A session whose i-th test uses fixture_lists[i], in module modules[i] (test_i.py by default),
    marked skip when i is in `skipped`, skipif(True) when in `skipped_if`."""
    modules = modules or [f"test_{i}.py" for i in range(len(fixture_lists))]

    def marks(i, name):
        if name == "skip" and i in skipped:
            return [pytest.mark.skip(reason="a GPU test off a GPU").mark]
        if name == "skipif" and i in skipped_if:
            return [pytest.mark.skipif(True, reason="bert_fast._C is not built").mark]
        return []

    items = [SimpleNamespace(fixturenames=list(names), path=modules[i],
                             iter_markers=lambda name=None, i=i: marks(i, name))
             for i, names in enumerate(fixture_lists)]
    config = SimpleNamespace(option=SimpleNamespace(collectonly=collectonly), _tmp_path_factory=tmp_path_factory)
    return SimpleNamespace(items=items, config=config)


BASE = os.getpriority(os.PRIO_PROCESS, 0)  # pytest's own, 0 unless it was started niced


def niceness() -> tuple[int, int]:
    """This thread's nice value and that of a process it starts."""
    child = subprocess.run(["nice"], capture_output=True, text=True, check=True).stdout
    return os.getpriority(os.PRIO_PROCESS, 0), int(child)


def test_used_jobs_start_in_order_of_first_use_and_the_fixture_waits(tmp_path_factory):
    jobs, order, release = early.Jobs(workers=1), [], threading.Event()

    def first(folder, threads):
        order.append(("first", folder.is_dir(), threads, niceness()))
        assert release.wait(10)  # still running when the test asks: the fixture must wait
        return "first done"

    def second(folder, threads):
        order.append(("second", folder.is_dir(), threads, niceness()))
        return "second done"

    def unused(folder, threads):
        order.append(("unused",))

    for fn in (second, first, unused):
        jobs.job(fn)
    try:
        started = jobs.start(session(tmp_path_factory, ["tmp_path"], ["first"], ["second", "first"],
                                    ["unused"], ["unused"], skipped={3}, skipped_if={4}))
        assert started == ["first", "second"]
        deadline = time.monotonic() + 10
        while not order and time.monotonic() < deadline:
            time.sleep(0.01)
        niced = (max(early.NICENESS, BASE),) * 2
        assert order == [("first", True, 1, niced)]  # began before anything asked for it
        threading.Timer(0.2, release.set).start()
        assert jobs.result("first", tmp_path_factory) == "first done"
        assert jobs.result("second", tmp_path_factory) == "second done"
        assert order == [("first", True, 1, niced), ("second", True, 1, niced)]
        assert niceness() == (BASE, BASE)  # the tests' own thread is not niced
    finally:
        release.set()
        jobs.stop()


def test_a_job_not_started_runs_when_asked_on_every_core(tmp_path_factory):
    jobs, calls = early.Jobs(), []

    def lazy(folder, threads):
        calls.append((threading.current_thread(), threads, niceness()))
        return folder.name

    jobs.job(lazy)
    assert jobs.start(session(tmp_path_factory, ["tmp_path"], ["lazy"], collectonly=True)) == []
    # Only its own module's tests: nothing to run beside, so nothing gained by starting it early.
    assert jobs.start(session(tmp_path_factory, ["tmp_path"], ["lazy"], modules=["test_a.py", "test_a.py"])) == []
    assert jobs.result("lazy", tmp_path_factory).startswith("lazy")
    assert calls == [(threading.current_thread(), 0, (BASE, BASE))]
    jobs.futures.clear()
    begun = jobs.begin("lazy", tmp_path_factory)  # a module starting it beside its own tests
    assert jobs.begin("lazy", tmp_path_factory) is begun and jobs.result("lazy", tmp_path_factory) == begun.result()
    assert calls[1][0] is not threading.current_thread() and calls[1][1:] == (1, (max(early.NICENESS, BASE),) * 2)
    jobs.stop()
    jobs.job(lazy)  # the same function again: no clash

    def another():
        def lazy(folder, threads):
            return None
        return lazy

    with pytest.raises(ValueError, match="two early jobs named lazy"):
        jobs.job(another())


def test_stop_kills_the_running_subprocess_and_drops_queued_jobs(tmp_path_factory):
    jobs, ran = early.Jobs(workers=1), []

    def sleeper(folder, threads):
        return jobs.run([sys.executable, "-c", "import time; time.sleep(120)"])

    def queued(folder, threads):
        ran.append("queued")

    jobs.job(sleeper)
    jobs.job(queued)
    assert jobs.start(session(tmp_path_factory, ["sleeper", "queued"], ["tmp_path"])) == ["sleeper", "queued"]
    deadline = time.monotonic() + 20
    while not jobs.processes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs.processes
    started = time.monotonic()
    jobs.stop()
    assert time.monotonic() - started < 10
    assert jobs.futures["sleeper"].result().returncode == -9  # SIGKILL
    assert jobs.futures["queued"].cancelled() and ran == []
    with pytest.raises(early.Stopped):
        jobs.run([sys.executable, "-c", "pass"])


def test_each_runs_one_after_another_in_an_early_job_and_at_once_otherwise():
    here, seen = threading.current_thread(), []
    assert early.each(1, lambda: seen.append(threading.current_thread()) or 1, lambda: 2) == [1, 2]
    assert seen == [here]
    barrier = threading.Barrier(2, timeout=10)  # passes only if both calls wait at once
    assert early.each(0, lambda: barrier.wait() * 0 + 1, lambda: barrier.wait() * 0 + 2) == [1, 2]


def test_report_returns_a_functions_json_result_from_a_fresh_interpreter(tmp_path):
    assert early.report("math", "hypot", 3, 4) == 5.0
    (tmp_path / "beside.py").write_text("def rows(n):\n    return [{'n': i} for i in range(n)]\n")
    assert early.report("beside", "rows", 2, path=tmp_path) == [{"n": 0}, {"n": 1}]
    assert early.report("os", "getpid") != os.getpid()
    with pytest.raises(AssertionError, match="ImportError"):
        early.report("math", "no_such_function")


def test_runs_get_the_sessions_environment_and_folder_and_are_killed_at_the_end(tmp_path_factory, monkeypatch,
                                                                                tmp_path):
    jobs, seen = early.Jobs(workers=1), threading.Event()
    show = [sys.executable, "-c", "import os; print(os.environ.get('EARLY_PROBE'), os.getcwd())"]

    def probe(folder, threads):
        assert seen.wait(10)  # the test below has changed the environment and folder by now
        return jobs.run(show).stdout.split(), jobs.timeout(10)

    def sleeper(folder, threads):
        return jobs.popen([sys.executable, "-c", "import time; time.sleep(120)"])

    jobs.job(probe)
    jobs.job(sleeper)
    monkeypatch.setenv("EARLY_PROBE", "session")
    here = os.getcwd()
    try:
        assert jobs.start(session(tmp_path_factory, ["probe", "sleeper"], ["tmp_path"])) == ["probe", "sleeper"]
        monkeypatch.setenv("EARLY_PROBE", "a test's")  # as a test running meanwhile may
        monkeypatch.chdir(tmp_path)
        seen.set()
        assert jobs.result("probe", tmp_path_factory) == (["session", here], 10 * early.NICED_TIMEOUT)
        sleeping = jobs.result("sleeper", tmp_path_factory)
        assert sleeping.poll() is None
        assert jobs.timeout(10) == 10  # not stretched in the tests' own thread
        assert jobs.run(show).stdout.split() == ["session", here]
    finally:
        jobs.stop()
    assert sleeping.wait(10) == -9  # SIGKILL, with its process group


def test_first_jobs_are_queued_first_the_others_wait_for_them_and_the_timeline_shows_each(tmp_path_factory,
                                                                                          monkeypatch):
    jobs, order, release = early.Jobs(workers=2), [], threading.Event()

    def builds(folder, threads):
        assert release.wait(10)
        order.append("builds")

    def loads(folder, threads):
        order.append("loads")

    jobs.job(builds)
    jobs.job(loads)
    monkeypatch.setattr(early, "FIRST", ("builds",))
    try:
        # `loads` is used first, but `builds` is FIRST.
        assert jobs.start(session(tmp_path_factory, ["loads"], ["tmp_path"], ["builds"])) == ["builds", "loads"]
        time.sleep(0.3)  # a free worker would have run `loads` by now
        assert order == []
        release.set()
        jobs.result("loads", tmp_path_factory)
        assert order == ["builds", "loads"]
        lines = jobs.timeline()
        assert [line.split()[0] for line in lines] == ["builds", "loads"]  # in the order queued
        asked = {line.split()[0]: line for line in lines}
        assert "waited" in asked["loads"] and not asked["loads"].endswith("waited     - s")
        assert asked["builds"].split("first asked")[1].split()[0] == "-"  # no test asked for it
    finally:
        release.set()
        jobs.stop()
