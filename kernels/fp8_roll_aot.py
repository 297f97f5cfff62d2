"""Ahead-of-time sm_90 builds of delayed FP8 scaling's roll (kernels/fp8_roll.py), without a GPU,
through kernels/aot.py: what bench/results/aot/fp8_roll.json holds (`python bench/fp8_roll.py
--compile-report`; checked by tests/test_fp8_roll.py).

Rows: the kernel as `Fp8State.roll` launches it (3 roles, one warp) at the default amax history
(Fp8Recipe's 16) and at a length that is no power of two (20: a padded, masked block). It has no
loop; registers, spills and shared memory are what a one-warp launch per state may cost.
"""

from __future__ import annotations

from bert_fast.kernels import aot, fp8_roll

ROLES = 3  # input, weight, gradient (bert_fast/ops/fp8_state.py)
LENGTHS = (16, 20)


def _spec(length: int) -> aot.AotSpec:
    signature = dict.fromkeys(("History", "AmaxNow", "Scale", "FormatMax", "Rolls"), "*fp32")
    constexprs = dict(ROLES=ROLES, LENGTH=length, PRIMED=fp8_roll.PRIMED, BLOCK_R=4,
                      BLOCK_L=1 << (length - 1).bit_length())
    return aot.AotSpec(fp8_roll._fp8_roll_kernel, signature, constexprs, num_warps=1, num_stages=1)


def fp8_roll_report() -> list[dict]:
    reports = aot.compile_reports([_spec(length) for length in LENGTHS])
    return [dict(kernel="roll", roles=ROLES, history=length, num_warps=r.num_warps, registers=r.registers,
                 spills=r.spills, shared_bytes=r.shared_bytes,
                 instructions_per_iteration=r.instructions_per_iteration)  # None: no loop
            for length, r in zip(LENGTHS, reports)]
