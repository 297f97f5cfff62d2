"""Static proof of LAMB's Triton fallback (kernels/lamb.py), without a GPU: its sm_90 builds must
match bench/results/aot/optim.json (`python bench/optim.py --compile-report`), spill nothing and
move the CUDA kernels' 40 bytes per parameter over both phases (issue 21)."""

import json
from pathlib import Path

import early
import pytest

from bert_fast.kernels import aot

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "aot"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(aot.unavailable_reason() is not None,
                                 reason=f"no AOT compile here: {aot.unavailable_reason()}")]


@early.job
def optim_report(folder, threads):
    """LAMB's Triton fallback's sm_90 report: an early job (tests/early.py)."""
    if aot.unavailable_reason() is not None:
        return None
    return early.report("bert_fast.kernels.lamb_aot", "optim_report")


def test_committed_report_matches_a_fresh_build_and_meets_the_targets(optim_report):
    fresh = optim_report
    committed = json.loads((RESULTS / "optim.json").read_text())
    assert committed == fresh, "the sm_90 builds changed: rerun bench/optim.py --compile-report"
    assert all(r["spills"] == 0 for r in fresh), fresh
    rows = {(r["kernel"], r["dtype"], r["aligned"]): r for r in fresh}
    # csrc/optim_kernels.cu: phase 1 reads w, g, m, v and writes m, v; phase 2 reads w, m, v and
    # writes w (and the bf16/fp16 copy): 40 bytes per float32 parameter, 40 for bf16 grads + copy.
    for grad, copy in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")):
        assert rows["phase1", grad, True]["bytes_per_param"] + rows["phase2", copy, True]["bytes_per_param"] == 40
    # Aligned addresses give 16-byte vector loads: fewer instructions per element than the
    # unaligned build a ZeRO piece at an odd offset takes.
    for kernel in ("phase1", "phase2"):
        aligned, unaligned = rows[kernel, "fp32", True], rows[kernel, "fp32", False]
        assert aligned["instructions_per_element"] < unaligned["instructions_per_element"], (aligned, unaligned)
    # Memory-bound with room: an H100 issues about 28 T thread-instructions/s against 3.35 TB/s,
    # so up to about 200 instructions per element at 24 bytes before the SMs set the pace.
    assert all(r["instructions_per_element"] is None or r["instructions_per_element"] <= 60 for r in fresh)
