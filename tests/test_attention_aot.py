"""Static proof of the attention kernels' speed, without a GPU: every autotune candidate is rebuilt
for sm_90 and must match bench/results/aot/attention.json (what `bench/attention.py
--compile-report` wrote and the repository holds), and the numbers must meet issue 18's targets:
no spills, Hopper's wgmma, and dropout costing at most 1.5x the instructions of the same loop
without it. A kernel change that moves these numbers must come with a fresh report."""

import json
from pathlib import Path

import early
import pytest

from bert_fast.kernels import aot

REPORT = Path(__file__).resolve().parents[1] / "bench" / "results" / "aot" / "attention.json"
KEY = ("kernel", "head_dim", "dtype", "block_m", "block_n", "num_warps", "num_stages", "dropout")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(aot.unavailable_reason() is not None,
                                 reason=f"no AOT compile here: {aot.unavailable_reason()}")]


@early.job
def fresh(folder, threads):
    """Every candidate rebuilt for sm_90: an early job (tests/early.py)."""
    if aot.unavailable_reason() is not None:
        return None
    return early.report("bert_fast.kernels.attention_aot", "report", "bf16")


def by_key(rows):
    return {tuple(r[k] for k in KEY): r for r in rows}


def test_committed_report_matches_a_fresh_build(fresh):
    committed = by_key(json.loads(REPORT.read_text()))
    built = by_key(fresh)
    assert sorted(committed) == sorted(built), "the candidates changed: rerun bench/attention.py --compile-report"
    for key, row in built.items():
        assert committed[key] == row, (f"{key}: the sm_90 build changed; rerun bench/attention.py "
                                       f"--compile-report\ncommitted {committed[key]}\nbuilt     {row}")


def test_every_candidate_meets_the_static_targets(fresh):
    twins = {tuple(r[k] for k in KEY[:-1]): r for r in fresh if not r["dropout"]}
    kernels = {r["kernel"] for r in fresh}
    assert kernels == {"fwd", "bwd", "bwd_one_q_block"}
    for row in fresh:
        name = tuple(row[k] for k in KEY)
        assert row["spills"] == 0, name
        assert row["uses_wgmma"], name
        assert row["shared_bytes"] <= 227 * 1024, name
        if row["dropout"]:
            twin = twins[tuple(row[k] for k in KEY[:-1])]
            assert len(row["mma_loops"]) == len(twin["mma_loops"]), name
            # Every loop (full and masked tiles, first/middle/last key tiles), not only the first.
            for ours, without in zip(row["mma_loops"], twin["mma_loops"]):
                assert ours <= 1.5 * without, (name, row["mma_loops"], twin["mma_loops"])
            if row["kernel"] == "fwd":
                assert row["registers"] <= 168, name


@early.job
def dropout_variant_rows(folder, threads):
    """bench/attention_dropout_variants.py's report() rows, computed in a fresh interpreter: an early
    job (tests/early.py)."""
    if aot.unavailable_reason() is not None:
        return None
    return early.report("attention_dropout_variants", "report", path=REPORT.parents[2])


def test_regenerating_the_mask_beats_storing_it(dropout_variant_rows):
    # bench/attention_dropout_variants.py: the backward draws the mask again (kernels/dropout.py)
    # rather than reading one bit per score that the forward stored. It must stay the cheaper way
    # in instructions per score element and in GEMMs, or the choice must be revisited.
    rows = dropout_variant_rows
    totals = {v: sum(r["instructions_per_score"] for r in rows if r["variant"] == v) for v in ("stored", "regenerate")}
    gemms = {v: sum(r["gemms"] for r in rows if r["variant"] == v) for v in ("stored", "regenerate")}
    assert totals["regenerate"] < totals["stored"] and gemms["regenerate"] < gemms["stored"], (totals, gemms)
