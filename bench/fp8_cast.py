"""FP8 casts of the FP8 GEMMs' operands at BERT shapes: kernels/fp8_cast.py (amax + scale + cast,
row-major and transposed copies in one pass) against the eager casts bert_fast/ops/fp8.py ran before it
(amax, the scale's guards, multiply, clamp, cast, and the backward's transpose copy).

    python bench/fp8_cast.py                  # GPU: BERT-large operands, bf16
    python bench/fp8_cast.py --device cpu     # tiny sizes, the eager casts only
    python bench/fp8_cast.py --compile-report # sm_90 builds, no GPU: bench/results/aot/fp8_cast.json

Cases: `tokens` x `width` (an activation or gradient [tokens, width]; a weight is [width, 1024]),
`scaling` current (amax pass, then the cast) or delayed (the state's scale; the cast records the
amax), both layouts written (what a training forward needs of x and W, and the backward of dY).
GB/s counts what the fused kernel must move: read the input once and write two fp8 copies
(2 + 2 bytes per bf16 element), plus the current-scaling amax pass's read.
"""

from __future__ import annotations

import torch
from harness import Benchmark, Unavailable

from bert_fast.kernels import fp8_cast as fc
from bert_fast.ops import fp8


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    x = torch.randn(case["tokens"], case["width"], device=device).to(dtype)
    state = fp8.Fp8State(fp8.Fp8Recipe(case["scaling"])).to(device)
    if state.delayed:
        state.scale.fill_(448.0 / 4.0)
    return {"x": x, "state": state}


def eager(inputs: dict, case: dict):
    """fp8.py's casts before the kernels: the eager ops and the transposed copy the backward read."""
    x, state = inputs["x"], inputs["state"]
    scale = fp8._scale_for(x, fp8.E4M3, state, 0, record=state.delayed)
    q = fp8.quantize(x, fp8.E4M3, scale)
    return q, q.t().contiguous(), scale.reciprocal()


def fused(inputs: dict, case: dict):
    x, state = inputs["x"], inputs["state"]
    if x.device.type != "cuda":
        raise Unavailable("the Triton kernels need CUDA (the interpreter is for tests)")
    if state.delayed:  # a primed state's cast (every step but the first): no amax pass
        return fc.cast(x, fc.E4M3, scale=state.scale, amax_now=state.amax_now, ticket=state.ticket,
                       scaled=True, transpose=True)
    return fc.cast(x, fc.E4M3, transpose=True)


def bytes_moved(case: dict, mode: str) -> float:
    elements = case["tokens"] * case["width"]
    size = 2 if bench.args is None or bench.args.device.startswith("cuda") else 4
    passes = size + 2 + (size if case["scaling"] == "current" else 0)
    return elements * passes


def aot_report() -> list[dict]:
    from bert_fast.kernels.fp8_cast_aot import fp8_cast_report

    return fp8_cast_report()


bench = Benchmark(
    name="fp8_cast",
    make_inputs=make_inputs,
    providers={"eager": eager, "fused": fused},
    gpu_cases=[dict(tokens=t, width=w, scaling=s) for s in ("delayed", "current") for w in (1024, 4096)
               for t in (16384, 65536)],
    cpu_cases=[dict(tokens=256, width=128, scaling=s) for s in ("delayed", "current")],
    modes=("forward",),
    bytes=bytes_moved,
    cpu_providers=("eager",),
    baseline="eager",
    description=__doc__.splitlines()[0],
    aot_report=aot_report,
)

if __name__ == "__main__":
    bench.main()
