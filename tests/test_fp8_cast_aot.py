"""Static proof of the FP8 cast kernels (kernels/fp8_cast.py), without a GPU: their sm_90 builds must
match bench/results/aot/fp8_cast.json (`python bench/fp8_cast.py --compile-report`), spill nothing,
and stay well inside what a memory-bound pass may issue per element."""

import json
from pathlib import Path

import pytest

from bert_fast.kernels import aot

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "aot"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(aot.unavailable_reason() is not None,
                                 reason=f"no AOT compile here: {aot.unavailable_reason()}")]


def test_committed_report_matches_a_fresh_build_and_meets_the_targets():
    from bert_fast.kernels import fp8_cast_aot

    fresh = fp8_cast_aot.fp8_cast_report()
    committed = json.loads((RESULTS / "fp8_cast.json").read_text())
    assert committed == fresh, "the sm_90 builds changed: rerun bench/fp8_cast.py --compile-report"
    assert all(r["spills"] == 0 for r in fresh), fresh
    rows = {(r["kernel"], r["dtype"], r["fp8"], r["scaling"], r["layout"]): r for r in fresh}
    # Delayed scaling reads x once and writes each fp8 copy once: bf16 in, two e4m3 copies out.
    assert rows["cast", "bf16", "e4m3", "delayed", "both"]["bytes_per_element"] == 2 + 1 + 1
    # Memory-bound with room: an H100 issues about 28 T thread-instructions/s against 3.35 TB/s,
    # 8.4 per byte moved before the SMs rather than memory set the pace; every pass stays under
    # half that (the transposed bf16 cast is the closest: 12.05 at 3 bytes). Recording the amax
    # costs the delayed pass at most 3.5 more per element than the current one.
    for r in fresh:
        if r["instructions_per_element"] is not None:
            assert r["instructions_per_element"] <= 4.2 * r["bytes_per_element"], r
    for layout in ("rowwise", "transposed", "both"):
        current, delayed = (rows["cast", "bf16", "e4m3", s, layout] for s in ("current", "delayed"))
        assert delayed["instructions_per_element"] - current["instructions_per_element"] <= 3.5, layout
