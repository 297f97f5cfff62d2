"""kernels/fp8_roll.py under the Triton interpreter: delayed FP8 scaling's roll in one launch equals
the eager ops it replaces bit for bit (the history's shift, the zeroed step amaxes, the scales, the
roll count), including the edge cases the scale has (an empty or non-finite history before and
after the state is primed, an amax so small that fp8_max / amax overflows), and `Fp8State.roll`
takes it on CUDA (here: with the kernels forced on)."""

from __future__ import annotations

import json
from pathlib import Path

import early
import pytest
import torch

from bert_fast.kernels import aot, fp8_roll
from bert_fast.ops import fp8, fp8_state
from helpers import count_launches_and_syncs

TOPS = {1: [448.0], 3: [448.0, 448.0, 57344.0], 5: [448.0, 57344.0, 448.0, 448.0, 57344.0]}


def _buffers(roles: int, length: int, seed: int, rolls: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    history = torch.rand(roles, length, generator=g) * 10.0 ** torch.randint(-6, 6, (roles, 1), generator=g)
    now = torch.rand(roles, generator=g) * 50
    return [history, now, torch.full((roles,), -1.0), torch.tensor(TOPS[roles]), torch.tensor([rolls])]


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    """Equal bits, NaN included."""
    return all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want))


def _edge_cases(length: int, rolls: float = 0.0) -> list[tuple[str, list[torch.Tensor]]]:
    """(name, buffers) for three roles: what the scale does at the edges of float32."""
    cases = []
    nan, inf, tiny = float("nan"), float("inf"), torch.finfo(torch.float32).tiny
    for name, row0, now0 in (
            ("empty", 0.0, 0.0),  # history and step all 0: scale 0, the next cast scales currently
            ("nan kept", nan, 1.0),  # a NaN stays in the history while it is in reach: scale 0
            ("inf", inf, 1.0),
            ("overflowing scale", 1e-45, 1e-45),  # 448 / 1e-45 is past float32: clamped to its max
            ("subnormal amax", tiny / 4, tiny / 2),
            ("step above the history", 1.0, 3e3)):
        history, now, scale, top, count = _buffers(3, length, seed=7, rolls=rolls)
        history[1].fill_(row0 if length > 1 else now0)
        now[1] = now0
        cases.append((name, [history, now, scale, top, count]))
    return cases


@pytest.mark.parametrize("roles, length", [(3, 16), (3, 1), (3, 2), (3, 20), (1, 4), (5, 7)])
def test_roll_equals_the_eager_ops_bit_for_bit(roles, length):
    for seed in range(3):
        got = _buffers(roles, length, seed, rolls=float(seed))
        want = [t.clone() for t in got]
        for _ in range(length + 2):  # past the history's length: the oldest entries drop out
            fp8_roll.roll(*got)
            fp8_roll.roll_reference(*want)
            assert _same(got, want), (seed, got, want)
            got[1].copy_(torch.rand(roles) * 7)
            want[1].copy_(got[1])


@pytest.mark.parametrize("rolls", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("length", [1, 3, 16])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy division
def test_roll_edge_cases_equal_the_eager_ops(length, rolls):
    """An empty history (every amax 0 or not finite) scales by 0 on the first roll (the cast then
    scales currently) and by 1 from the second on (the history has taken in a step)."""
    for name, got in _edge_cases(length, rolls):
        want = [t.clone() for t in got]
        fp8_roll.roll(*got)
        fp8_roll.roll_reference(*want)
        assert _same(got, want), (name, got, want)
        scale = got[2][1].item()
        if name == "overflowing scale":
            assert scale == torch.finfo(torch.float32).max
        if name == "empty" or (name in ("nan kept", "inf") and length > 1):  # still in reach
            assert scale == (0.0 if rolls == 0 else 1.0), name
        assert got[4].item() == min(rolls + 1, 2), name


def test_the_first_roll_leaves_an_empty_history_unscaled_and_the_count_stops_at_two():
    for run in (fp8_roll.roll, fp8_roll.roll_reference):
        history, now, scale, top, rolls = _buffers(3, 4, seed=1)
        history.zero_()
        now.zero_()
        seen = []
        for _ in range(4):
            run(history, now, scale, top, rolls)
            seen.append((scale.tolist(), rolls.item()))
        assert seen == [([0.0] * 3, 1.0)] + [([1.0] * 3, 2.0)] * 3, run


def test_the_state_rolls_in_one_launch_as_its_eager_ops_do(monkeypatch):
    """Fp8State.roll through the kernel (as on CUDA) against its own eager ops, over steps that
    record amaxes between rolls and a history shorter than the run: the same buffers, one launch
    and no device read per roll, and the host's count of the rolls (`primed`) the device's."""
    states = {on: fp8.Fp8State(fp8.Fp8Recipe("delayed", amax_history=3)) for on in (True, False)}
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        amaxes = torch.rand(3, generator=g) * 10.0 ** (step - 3)
        for on, state in states.items():
            monkeypatch.setattr(fp8_state, "_use_kernels", lambda device, on=on: on)
            for role in range(3):
                state.record(role, amaxes[role])
            with count_launches_and_syncs(fp8_roll) as counts:
                fp8.roll([state])
            assert counts == {"launches": 1 if on else 0, "syncs": 0}
            assert state.primed == (step >= 1) and state.rolls.item() == min(step + 1, 2)  # host and device
        assert all(_same([a], [b]) for a, b in zip(states[True].buffers(), states[False].buffers())), step
    assert states[True].scale.gt(0).all()


def test_bad_buffers_are_refused_by_name():
    history, now, scale, top, rolls = _buffers(3, 4, seed=0)
    with pytest.raises(ValueError, match="history must be a 2-D"):
        fp8_roll.roll(history[0], now, scale, top, rolls)
    with pytest.raises(ValueError, match="amax_now must be a contiguous float32"):
        fp8_roll.roll(history, now.double(), scale, top, rolls)
    with pytest.raises(ValueError, match=r"scale must be .* of shape \(3,\)"):
        fp8_roll.roll(history, now, scale[:2], top, rolls)
    with pytest.raises(ValueError, match="history must be a contiguous"):
        fp8_roll.roll(history.t().contiguous().t(), now, scale, top, rolls)
    with pytest.raises(ValueError, match=r"rolls must be .* of shape \(1,\)"):
        fp8_roll.roll(history, now, scale, top, rolls.reshape(()))


def test_registered_op_schema():
    # The fake-tensor and AOT-dispatch checks need a compiled kernel (tests/test_fp8_compile.py
    # traces the op into the compiled step with fake tensors).
    torch.library.opcheck(torch.ops.bert_fast.fp8_roll.default, tuple(_buffers(3, 4, seed=0)),
                          test_utils="test_schema")


REPORT = Path(__file__).resolve().parents[1] / "bench" / "results" / "aot" / "fp8_roll.json"


@pytest.mark.skipif(aot.unavailable_reason() is not None, reason=f"no AOT compile here: {aot.unavailable_reason()}")
def test_the_committed_sm90_report_is_a_fresh_build_in_a_few_registers():
    """bench/results/aot/fp8_roll.json (`python bench/fp8_roll.py --compile-report`) is what the
    kernel builds to for sm_90 today: one warp, no spills, no shared memory, few registers."""
    committed = json.loads(REPORT.read_text())
    assert committed == early.report("bert_fast.kernels.fp8_roll_aot", "fp8_roll_report"), \
        "the sm_90 build changed: rerun bench/fp8_roll.py --compile-report"
    for row in committed:
        assert row["num_warps"] == 1 and row["spills"] == 0 and row["shared_bytes"] == 0, row
        assert row["registers"] <= 32, row
