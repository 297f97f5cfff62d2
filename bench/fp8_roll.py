"""Delayed FP8 scaling's roll of every GEMM state before a training forward: kernels/fp8_roll.py (one
launch per state) against the eager ops it replaced (17 kernels per state, kernels/fp8_roll.py
`roll_reference`, still the CPU's path).

    python bench/fp8_roll.py                  # GPU: BERT-base and -large (48 and 96 states)
    python bench/fp8_roll.py --device cpu     # a few states, the eager ops only
    python bench/fp8_roll.py --compile-report # sm_90 builds, no GPU: bench/results/aot/fp8_roll.json

Cases: `states` Fp8States (4 per encoder layer) with an amax history of `history` steps. What a
roll moves is tiny (the history read and written, the amaxes and scales): the time is launches,
which a CUDA graph captured from the eager step replays one by one too.
"""

from __future__ import annotations

import torch
from harness import Benchmark, Unavailable

from bert_fast.kernels import fp8_roll
from bert_fast.ops import fp8


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    recipe = fp8.Fp8Recipe("delayed", amax_history=case["history"])
    states = [fp8.Fp8State(recipe).to(device) for _ in range(case["states"])]
    for s in states:
        s.amax_history.uniform_(0.5, 2.0)
        s.amax_now.uniform_(0.5, 2.0)
    return {"buffers": [(s.amax_history, s.amax_now, s.scale, s.format_max, s.rolls) for s in states]}


def eager(inputs: dict, case: dict):
    for buffers in inputs["buffers"]:
        fp8_roll.roll_reference(*buffers)


def fused(inputs: dict, case: dict):
    if inputs["buffers"][0][0].device.type != "cuda":
        raise Unavailable("the Triton kernel needs CUDA (the interpreter is for tests)")
    for buffers in inputs["buffers"]:
        fp8_roll.roll(*buffers)


def bytes_moved(case: dict, mode: str) -> float:
    # Per state: the history read and written, the amaxes read and zeroed, the maxima read, the scales
    # written; the roll count read and written.
    return case["states"] * (3 * 4 * (2 * case["history"] + 2 + 2) + 2 * 4)


def aot_report() -> list[dict]:
    from bert_fast.kernels.fp8_roll_aot import fp8_roll_report

    return fp8_roll_report()


bench = Benchmark(
    name="fp8_roll",
    make_inputs=make_inputs,
    providers={"eager": eager, "triton": fused},
    gpu_cases=[dict(states=s, history=16) for s in (96, 48)],
    cpu_cases=[dict(states=4, history=16), dict(states=4, history=3)],
    modes=("forward",),
    bytes=bytes_moved,
    cpu_providers=("eager",),
    baseline="eager",
    description=__doc__.splitlines()[0],
    aot_report=aot_report,
)

if __name__ == "__main__":
    bench.main()
