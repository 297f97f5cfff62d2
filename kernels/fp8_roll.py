"""Delayed FP8 scaling's roll (bert_fast/ops/fp8_state.py `Fp8State.roll`) in one launch: the step's amaxes
enter the history (newest first, the oldest dropped), the step's amaxes restart at 0, each
role's scale follows from its history's maximum, and the state's roll count moves on (counted up
to 2).

Why a kernel: every training forward rolls every FP8 GEMM's state (4 per encoder layer, 96 in
BERT-large) before it runs, and the eager ops of one roll were 17 CUDA kernels (cat, two copies,
the zero, the amax, six for isfinite and the masks, the division, the clamp, two wheres and their
fills; 21 with the roll count's): 1632 launches a forward, more than the rest of the FP8 step
launches, replayed as such by a CUDA graph captured from it. This is one launch per state, one warp.

Numerics are those of the eager ops, bit for bit (tests/test_fp8_roll.py): the maximum keeps NaN
as `amax` does; scale = fp8_max / amax (IEEE division, `div_rn`, as tensor / tensor rounds) clamped
to the float32 maximum where amax is finite and positive. Where it is not (an empty history: every
entry 0 or not finite), the scale is 0 until the history has taken in a step's record (the first
two rolls: the first forward, with nothing recorded before it, scales currently, from the amax
pass kernels/fp8_cast.py runs before a cast whose scale is 0), and 1 after (Transformer Engine's
initial scale). So from the second training forward on every scale is positive, and the casts
need no amax pass: the host knows it from its own count of the rolls, without reading the device
(bert_fast/ops/fp8_state.py `Fp8State.primed`). What this costs: a role whose first recorded step
had no finite amax (an fp16 overflow on step 1) scales by 1 on step 2 rather than currently; an
e5m2 gradient at scale 1 keeps fp16's normal range, e4m3 saturates past 448 for that step.

Launches: eagerly `kernel[grid]`; under torch.compile / export inside the `bert_fast::fp8_roll`
triton_op (it mutates the four buffers), so fullgraph traces have no break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from bert_fast.kernels.launch import launch as _launch
from bert_fast.kernels.launch import traced as _traced
from bert_fast.kernels.launch import traced_body

_FLOAT32_MAX = 3.4028234663852886e38
# The roll count at which a state is primed: its history has taken in a step that could record, and
# an empty history scales by 1 (the count stops there).
PRIMED = 2


@triton.jit
def _fp8_roll_kernel(
    History,  # [ROLES, LENGTH] float32, newest first: shifted by one, AmaxNow in front
    AmaxNow,  # [ROLES] float32: the step's amaxes, zeroed
    Scale,  # [ROLES] float32 out
    FormatMax,  # [ROLES] float32: each role's fp8_max
    Rolls,  # [1] float32: the rolls so far, counted up to PRIMED (in and out)
    ROLES: tl.constexpr, LENGTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    PRIMED: tl.constexpr,
):
    r = tl.arange(0, BLOCK_R)[:, None]
    c = tl.arange(0, BLOCK_L)[None, :]
    role = r < ROLES
    inside = role & (c < LENGTH)
    older = tl.load(History + r * LENGTH + c - 1, mask=role & (c >= 1) & (c < LENGTH), other=0.0)
    now = tl.load(AmaxNow + r, mask=role, other=0.0)
    history = tl.where(c == 0, now, older)
    # Every thread's loads are done before any thread overwrites what another one reads.
    tl.debug_barrier()
    tl.store(History + r * LENGTH + c, history, mask=inside)
    tl.store(AmaxNow + r, tl.zeros_like(now), mask=role)
    # The history's maximum, NaN if it holds one (tl.max drops NaN on the GPU: a flag carries it).
    has_nan = tl.max((history != history).to(tl.int32), 1)
    amax = tl.where(has_nan > 0, float("nan"), tl.max(tl.where(inside, history, float("-inf")), 1))
    rows = tl.arange(0, BLOCK_R)
    top = tl.load(FormatMax + rows, mask=rows < ROLES, other=1.0)
    ok = (amax > 0) & (amax < float("inf"))
    scale = tl.minimum(tl.math.div_rn(top, tl.where(ok, amax, 1.0)), 3.4028234663852886e38)
    rolls = tl.minimum(tl.load(Rolls) + 1.0, PRIMED)  # this roll's count
    empty = tl.where(rolls >= PRIMED, 1.0, 0.0)
    tl.store(Scale + rows, tl.where(ok, scale, empty), mask=rows < ROLES)
    tl.store(Rolls, rolls)


def _roll(history: torch.Tensor, amax_now: torch.Tensor, scale: torch.Tensor, format_max: torch.Tensor,
          rolls: torch.Tensor, traced: bool) -> None:
    roles, length = history.shape
    _launch(_fp8_roll_kernel, (1,), traced)(
        history, amax_now, scale, format_max, rolls, ROLES=roles, LENGTH=length, PRIMED=PRIMED,
        BLOCK_R=triton.next_power_of_2(roles), BLOCK_L=triton.next_power_of_2(length), num_warps=1)


@triton_op("bert_fast::fp8_roll", mutates_args=("history", "amax_now", "scale", "rolls"))
def _fp8_roll_op(history: torch.Tensor, amax_now: torch.Tensor, scale: torch.Tensor,
                 format_max: torch.Tensor, rolls: torch.Tensor) -> None:
    _roll(history, amax_now, scale, format_max, rolls, traced_body(history))


def roll(history: torch.Tensor, amax_now: torch.Tensor, scale: torch.Tensor,
         format_max: torch.Tensor, rolls: torch.Tensor) -> None:
    """In place: history [R, L] <- [amax_now, history[:, :-1]] per row, amax_now [R] <- 0, scale [R]
    <- format_max / max(history row) (clamped to the float32 max; where that maximum is 0 or not
    finite: 1 once primed, else 0), rolls [1] <- min(rolls + 1, PRIMED) first. All contiguous
    float32 on one device (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    if not isinstance(history, torch.Tensor) or history.dim() != 2 or history.shape[1] < 1:
        raise ValueError(f"history must be a 2-D tensor [roles, length >= 1], got "
                         f"{tuple(getattr(history, 'shape', ()))}")
    roles = history.shape[0]
    named = (("history", history), ("amax_now", amax_now), ("scale", scale), ("format_max", format_max),
             ("rolls", rolls))
    for name, t in named:
        shape = (roles, history.shape[1]) if t is history else (1,) if name == "rolls" else (roles,)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not t.is_contiguous() \
                or t.device != history.device or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be a contiguous float32 tensor on {history.device} of shape "
                             f"{shape}, got {getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', None)}")
    if _traced(history):
        _fp8_roll_op(history, amax_now, scale, format_max, rolls)
    else:
        _roll(history, amax_now, scale, format_max, rolls, False)


def roll_reference(history: torch.Tensor, amax_now: torch.Tensor, scale: torch.Tensor,
                   format_max: torch.Tensor, rolls: torch.Tensor) -> None:
    """`roll` in eager PyTorch: the CPU's path (`Fp8State.roll`) and the test oracle."""
    history.copy_(torch.cat([amax_now[:, None], history[:, :-1]], dim=1))
    amax_now.zero_()
    rolls.copy_((rolls + 1.0).clamp(max=PRIMED))
    scale.copy_(scales_of(history, format_max, rolls))


def scales_of(history: torch.Tensor, format_max: torch.Tensor, rolls: torch.Tensor) -> torch.Tensor:
    """The scales `roll` writes, in eager PyTorch, from a history and the count after the roll:
    per row scale_from_amax(max(row), its format_max, empty= 1 once primed, else 0)."""
    return scale_from_amax(history.amax(dim=1), format_max, rolls.ge(PRIMED).float())


def scale_from_amax(amax: torch.Tensor, top: float | torch.Tensor,
                    empty: float | torch.Tensor) -> torch.Tensor:
    """top / amax (float32, as torch rounds the division) clamped to the float32 max, and `empty`
    where amax is 0 or not finite: delayed scaling's scale from a history's maximum, and current
    scaling's (empty 1) from a tensor's amax (bert_fast/ops/fp8_state.py)."""
    ok = (amax > 0) & torch.isfinite(amax)
    scale = (top / torch.where(ok, amax, torch.ones_like(amax))).clamp(max=_FLOAT32_MAX)
    return torch.where(ok, scale, empty)
