"""tests/together.py: the calls run at the same time, results come back in the order given, and a
failing call's exception is raised only once every call has returned."""

import threading
import time

import pytest
from together import run_together


def test_calls_run_at_once_and_results_keep_their_order():
    barrier = threading.Barrier(3, timeout=10)  # passes only if all three calls wait at once

    def call(value):
        def waiting():
            barrier.wait()
            time.sleep(0.01 * (3 - value))  # the first call given finishes last
            return value
        return waiting

    assert run_together(call(1), call(2), call(3)) == [1, 2, 3]


def test_a_failure_is_raised_after_every_call_returned():
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append("slow")
        return "slow"

    def failing():
        raise AssertionError("this call failed")

    with pytest.raises(AssertionError, match="this call failed"):
        run_together(failing, slow)
    assert finished == ["slow"]


def test_no_call_is_an_error():
    with pytest.raises(ValueError, match="at least one call"):
        run_together()
