"""The spawned-rank harness (tests/ranks.py) reports a rank that dies natively by its signal, how
far it got and what it printed, and does not wait on the peer it left stuck in a collective."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install adds it)")

from ranks import run_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("deepspeed_shm_op")


def _abort_on_rank0(rank, result):
    result["joined"] = True
    if rank == 0:
        os.abort()  # as a C++ std::terminate would
    torch.distributed.barrier()  # rank 1 waits here for a peer that is gone


def _fine(rank, result):
    t = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(t)
    result["sum"] = t.item()


@pytest.mark.slow
def test_a_native_abort_is_reported_with_its_signal_progress_and_frame(tmp_path):
    launch = run_ranks(_abort_on_rank0, 2, tmp_path, grace=2.0)
    assert launch.exitcodes[0] == -6 and launch.exitcodes[1] != 0, launch.exitcodes  # rank 1: peer lost
    assert launch.results == [{"joined": True}, {"joined": True}]
    first = launch.failures()[0]
    assert first.startswith("rank 0 was killed by SIGABRT after recording 'joined'"), first
    assert "Fatal Python error: Aborted" in first and "_abort_on_rank0" in first, first
    with pytest.raises(pytest.fail.Exception, match=r"^rank 0 was killed by SIGABRT"):
        launch.finished_results()


@pytest.mark.slow
def test_clean_ranks_return_their_results(tmp_path):
    launch = run_ranks(_fine, 2, tmp_path)
    launch.check_exits()
    assert launch.exitcodes == [0, 0] and launch.finished_results() == [{"sum": 3.0}, {"sum": 3.0}]


def _quit_early_on_rank0(rank, result):
    result["joined"] = True
    if rank == 0:
        raise SystemExit(0)  # a clean exit code, but the work was not done


@pytest.mark.slow
def test_a_rank_that_exits_0_without_finishing_is_a_failure(tmp_path):
    launch = run_ranks(_quit_early_on_rank0, 2, tmp_path, grace=2.0)
    assert launch.exitcodes[0] == 0 and launch.returned == [False, True]
    assert launch.failures()[0].startswith("rank 0 exited 0 before its worker returned after recording 'joined'")
    with pytest.raises(pytest.fail.Exception, match=r"^rank 0 exited 0 before its worker returned"):
        launch.finished_results()
