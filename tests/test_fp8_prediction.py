"""bench/fp8_prediction.py, issue 23's static FP8 speedup prediction: the committed JSON and table are
what the committed inputs give, and its FLOP, byte and time arithmetic matches counts written out by
hand here."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fp8_prediction as fp  # noqa: E402

from bert_fast.model.config import BertConfig  # noqa: E402
from bert_fast.ops.fp8 import GEMMS  # noqa: E402

RESULTS = fp.DEFAULT_RESULTS
# BERT-large (H 1024, I 4096), one layer, 16384 tokens (seq 128 x batch 128 and seq 512 x batch 32):
# multiply-adds per token QKV 1024*3072 + attention output 1024*1024 + FFN in 1024*4096 + FFN out
# 4096*1024 = 12,582,912; 2 FLOPs each, forward + dX + dW: 6 * 16384 * 12,582,912.
LAYER_GEMM_FLOPS = 1_236_950_581_248
# Cast per layer: inputs 16384 * (1024 + 1024 + 1024 + 4096), output gradients
# 16384 * (3072 + 1024 + 4096 + 1024), weights 3072*1024 + 1024*1024 + 4096*1024 + 1024*4096.
LAYER_CAST = {"inputs": 117_440_512, "gradients": 150_994_944, "weights": 12_582_912}
# The FFN's [tokens, 4H] activation per layer: 16384 * 4096. Its two casts carry the GELU when fused.
LAYER_FFN = 67_108_864
# Cast bytes per layer, bf16 in. Unfused, every operand costs the plain pass: delayed 2 read + 1 + 1
# written = 4 per element, current 6 (the amax pass reads 2 more): (117,440,512 + 150,994,944 +
# 12,582,912) = 281,018,368 elements * 4 = 1,124,073,472 delayed, * 6 = 1,686,110,208 current.
# Fused: ffn_out's input cast reads y instead of h: 4 (6 current), no change; ffn_in's gradient cast
# reads dh and y: 6 (current: + its amax pass's 4 = 10) instead of 4 (6): + 2 * 67,108,864 =
# 134,217,728 delayed, + 4 * 67,108,864 = 268,435,456 current.
LAYER_CAST_BYTES = {"delayed": {"unfused": 1_124_073_472, "fused": 1_258_291_200},
                    "current": {"unfused": 1_686_110_208, "fused": 1_954_545_664}}
# Taken out of the measured rest when fused: bias + GELU forward (read y, write h: 4), backward (read dh
# and y, write g: 6), bias-gradient sum (read g: 2): 12 * 67,108,864.
LAYER_BIAS_GELU_BYTES = 805_306_368


def test_committed_prediction_is_what_the_committed_inputs_give():
    committed = json.loads((RESULTS / "fp8_prediction.json").read_text())
    # the GPU suite predicts from this visit's fast_packed row where it has one (bench/gpu_suite.sh)
    fresh = fp.predict(RESULTS, committed["inputs"]["bf16_provider"])
    assert committed == fresh, "inputs or model changed: rerun python bench/fp8_prediction.py"
    assert (RESULTS / "fp8_prediction.md").read_text() == fp.markdown(fresh)


def test_one_layer_gemm_flops_and_cast_elements_match_a_hand_count():
    one = BertConfig.from_preset("large", vocab_size=fp.VOCAB, num_hidden_layers=1)
    assert set(fp.layer_gemms(one, 16384)) == set(GEMMS)  # exactly the GEMMs fp8.py runs in FP8
    assert fp.fp8_gemm_flops(one, 16384) == LAYER_GEMM_FLOPS
    assert fp.cast_elements(one, 16384) == LAYER_CAST
    assert fp.ffn_elements(one, 16384) == LAYER_FFN


def test_fused_casts_bytes_per_element_come_from_the_report():
    """Per bf16 element, from bench/results/aot/fp8_cast.json: plain 4 / 6 (delayed / current), the
    GELU cast 4 / 6 (reads y in place of h), the GELU-gradient cast 6 / 10 (reads dh and y). Net per
    [tokens, 4H] element against the plain casts plus the bf16 bias-GELU's 12: delayed 4 + 6 fewer
    (forward 8 -> 4, backward 12 -> 6), current 4 + 4 (10 -> 6, 14 -> 10)."""
    report = json.loads(fp.CAST_REPORT.read_text())
    got = {s: [fp.cast_bytes_per_element(report, s, f, p) for f, p in
               (("e4m3", "-"), ("e5m2", "-"), ("e4m3", "gelu"), ("e5m2", "gelu_grad"))] for s in fp.SCALINGS}
    assert got == {"delayed": [4, 4, 4, 6], "current": [6, 6, 6, 10]}
    assert fp.BIAS_GELU_BYTES == 12

def test_issue_bound_cast_time_takes_the_longer_of_bytes_and_instructions():
    """Per element: bytes at copy bandwidth against sm_90 instructions at 28 T/s. Plain delayed cast
    (4 bytes, ~14 instructions) at 1000 GB/s: 4 ps against 0.5: memory. At 10,000 GB/s the bytes take
    0.4 ps and the instructions decide; current scaling adds its amax pass."""
    report = json.loads(fp.CAST_REPORT.read_text())
    rows = {fp.row_key(r): r for r in report}
    plain = rows["cast", "bf16", "e4m3", "delayed", "both", "-"]
    assert fp.cast_ns_per_element(report, "delayed", "e4m3", 1000.0) == pytest.approx(0.004)
    assert fp.cast_ns_per_element(report, "delayed", "e4m3", 1e4) == \
        pytest.approx(plain["instructions_per_element"] / 28e12 * 1e9)
    gelu, amax = rows["cast", "bf16", "e4m3", "current", "both", "gelu"], rows["amax", "bf16", "-", "current", "-",
                                                                                  "gelu"]
    assert fp.cast_ns_per_element(report, "current", "e4m3", 1e4, "gelu") == pytest.approx(
        (gelu["instructions_per_element"] + amax["instructions_per_element"]) / 28e12 * 1e9)


def test_the_rest_of_the_step_is_attention_and_the_heads():
    """other = step - FP8 GEMMs, checked against attention + MLM head + pooler counted by hand
    (forward x 3), at seq 128 batch 128 with 20 predictions per sequence."""
    row = next(r for r in json.loads((RESULTS / "fp8_prediction.json").read_text())["rows"]
               if r["seq"] == 128 and r["scaling"] == "delayed")
    attention = 24 * 3 * 4 * 128 * 128 * 1024 * 128  # QK^T and PV per layer: 4 s^2 H per sequence
    mlm = 3 * 2 * (128 * 20) * (1024 * 1024 + 1024 * 30522)  # transform + decoder on predicted tokens
    pooler = 3 * 128 * (2 * 1024 * 1024 + 4 * 1024)  # pooler + NSP classifier per sequence
    assert row["fp8_gemm_tflop"] == pytest.approx(24 * LAYER_GEMM_FLOPS / 1e12, rel=1e-5)
    assert row["other_tflop"] == pytest.approx((attention + mlm + pooler) / 1e12, rel=1e-5)


def _inputs(tmp_path: Path, ceilings: dict, ms: dict[int, float]) -> Path:
    (tmp_path / "ceilings.json").write_text(json.dumps({"meta": {"device": "test GPU"}, **ceilings}))
    rows = [{"model": "large", "seq": s, "batch": b, "provider": "torch", "status": "ok", "ms": ms[s]}
            for s, b in ((128, 128), (512, 32))]
    (tmp_path / "e2e.json").write_text(json.dumps({"meta": {"commit": "abc"}, "rows": rows}))
    return tmp_path


def test_step_time_model_with_a_measured_fp8_ceiling(tmp_path):
    """Round numbers: bf16 1000 TFLOP/s, fp8 2500 (measured: taken over 2x bf16), copy 1000 GB/s, so
    1 GB is 1 ms. 24 layers: delayed casts 24 * 1.2582912 GB = 30.1989888 ms fused, 26.977763328
    unfused; current 46.909095936 and 40.466644992; bias-GELU 24 * 0.805306368 GB = 19.327352832 ms."""
    results = _inputs(tmp_path, {"copy_gbs": 1000.0, "bf16_matmul_tflops": 1000.0, "fp8_matmul_tflops": 2500.0},
                      {128: 100.0, 512: 120.0})
    got = fp.predict(results)
    assert got["inputs"]["fp8_matmul_source"].startswith("measured")
    gemm = 24 * LAYER_GEMM_FLOPS
    assert {s: {k: 24 * v / 1e9 for k, v in b.items()} for s, b in LAYER_CAST_BYTES.items()} == {
        "delayed": {"unfused": pytest.approx(26.977763328), "fused": pytest.approx(30.1989888)},
        "current": {"unfused": pytest.approx(40.466644992), "fused": pytest.approx(46.909095936)}}
    gelu_ms = 24 * LAYER_BIAS_GELU_BYTES / 1e12 * 1e3
    assert gelu_ms == pytest.approx(19.327352832)
    for row in got["rows"]:
        step = {128: 100.0, 512: 120.0}[row["seq"]]
        bf16_gemm_ms, fp8_gemm_ms = gemm / 1e15 * 1e3, gemm / 2.5e15 * 1e3
        cast_ms, unfused_cast_ms = (24 * LAYER_CAST_BYTES[row["scaling"]][k] / 1e12 * 1e3
                                    for k in ("fused", "unfused"))
        fp8_step = step - bf16_gemm_ms - gelu_ms + fp8_gemm_ms + cast_ms
        unfused_step = step - bf16_gemm_ms + fp8_gemm_ms + unfused_cast_ms
        assert row["cast_ms"] == pytest.approx(cast_ms, rel=1e-5)
        assert row["bias_gelu_ms"] == pytest.approx(gelu_ms, rel=1e-5)
        assert row["fp8_step_ms"] == pytest.approx(fp8_step, rel=1e-5)
        assert row["speedup"] == pytest.approx(step / fp8_step, rel=1e-5)
        assert row["fp8_tokens_s"] == pytest.approx(16384 / fp8_step * 1e3, rel=1e-5)
        u = row["unfused"]
        assert u["cast_ms"] == pytest.approx(unfused_cast_ms, rel=1e-5)
        assert u["fp8_step_ms"] == pytest.approx(unfused_step, rel=1e-5)
        assert u["speedup"] == pytest.approx(step / unfused_step, rel=1e-5)
        # The fusion saves 12 bytes of bias-GELU per element and costs the casts 2 (delayed) or 4 more.
        saved = 24 * LAYER_FFN * {"delayed": 10, "current": 8}[row["scaling"]] / 1e9
        assert u["fp8_step_ms"] - row["fp8_step_ms"] == pytest.approx(saved, abs=1e-3)  # rows hold 6 digits
        # GEMMs at 80% of both ceilings: more of the bf16 step is GEMM, the rest shrinks.
        at_80 = step / (step - bf16_gemm_ms / 0.8 - gelu_ms + fp8_gemm_ms / 0.8 + cast_ms)
        assert row["speedup_if_gemms_at"]["0.8"] == pytest.approx(at_80, rel=1e-5)
        # At the bf16 rest it names, the speedup is exactly the target (the fp8 rest is that - gelu).
        rest = row["remainder_ms_for_target"]
        assert (bf16_gemm_ms + rest) / (fp8_gemm_ms + cast_ms + rest - gelu_ms) == pytest.approx(1.3, rel=1e-4)
        rest = row["remainder_ms_for_tokens_target"]
        assert 16384 / (fp8_gemm_ms + cast_ms + rest - gelu_ms) * 1e3 == pytest.approx(250e3, rel=1e-5)


def test_fp8_ceiling_defaults_to_twice_bf16_and_says_so(tmp_path):
    results = _inputs(tmp_path, {"copy_gbs": 1000.0, "bf16_matmul_tflops": 1000.0, "fp8_matmul_tflops": None},
                      {128: 100.0, 512: 120.0})
    got = fp.predict(results)
    assert got["inputs"]["fp8_matmul_tflops"] == 2000.0 and "assumed" in got["inputs"]["fp8_matmul_source"]
    assert got["rows"][0]["fp8_gemm_ms"] == pytest.approx(24 * LAYER_GEMM_FLOPS / 2e15 * 1e3, rel=1e-5)


def test_errors_name_the_file_key_and_row(tmp_path):
    with pytest.raises(FileNotFoundError, match="ceilings.json"):
        fp.predict(tmp_path)
    results = _inputs(tmp_path, {"copy_gbs": None, "bf16_matmul_tflops": 1000.0}, {128: 100.0, 512: 120.0})
    with pytest.raises(ValueError, match="copy_gbs"):
        fp.predict(results)
    results = _inputs(tmp_path, {"copy_gbs": 1000.0, "bf16_matmul_tflops": 1000.0}, {128: 100.0, 512: 120.0})
    with pytest.raises(ValueError, match="provider 'fast_packed' at large seq 128"):
        fp.predict(results, provider="fast_packed")
