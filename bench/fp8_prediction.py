"""A static prediction of FP8's end-to-end speedup (issue 23, `precision.fp8`) from the measured bf16
step, made before any FP8 step has run on a GPU.

    python bench/fp8_prediction.py [--results DIR] [--provider torch] [--out DIR]

Reads DIR/ceilings.json, DIR/e2e.json (default DIR: bench/results/nvidia-h200) and the sm_90 cast
report bench/results/aot/fp8_cast.json; writes fp8_prediction.json and .md into DIR (or --out).

The model, per BERT-large e2e case with full-length sequences (bench/e2e.py's GPU cases) and per
FP8 scaling (`delayed`, e2e's `fast_packed_fp8` row; `current`, `fast_packed_fp8_current`):
- FLOPs: the encoder's four GEMMs per layer (bert_fast/ops/fp8.py GEMMS), forward and both backward
  GEMMs, from their shapes; the rest of the step is bert_fast/train/flops.py `step_flops` minus them.
- bf16: those GEMMs take their FLOPs at the measured bf16 matmul ceiling; the remainder of the
  measured bf16 step (the provider's row, e2e.json) is everything else and stays as it is.
- FP8: the same GEMMs at the FP8 ceiling (ceilings.json's `fp8_matmul_tflops` where measured,
  else assumed 2x bf16, the H100/H200 datasheet ratio: 1979 against 989 dense TFLOP/s), plus the
  casts of kernels/fp8_cast.py moving their bytes at the measured copy bandwidth: every GEMM's
  input and output gradient once per step, its weight once per optimizer step (one per step
  here), each read in bf16 and written as both fp8 layouts; current scaling adds the amax pass's
  read (bytes per element: the AOT report).
- The FFN's bias + GELU fused into two of those casts (bert_fast/ops/fp8_ffn.py): ffn_out's input
  cast is the report's `gelu` row (read y, write gelu(y + b) in both e4m3 layouts) and ffn_in's
  output-gradient cast its `gelu_grad` row (read dh and y, write dh * gelu'(y + b) in both e5m2
  layouts, the bias gradient summed on the way); under current scaling their amax passes read
  what they read. Assumed: the measured bf16 rest holds the bias + GELU forward (read y, write h:
  4 bytes per [tokens, 4H] element), its backward (read dh and y, write g: 6) and the bias-gradient
  sum (read g: 2) at copy bandwidth, 12 bytes per element that the fused FP8 step no longer moves,
  so they leave the rest. The unfused figures (plain casts of h and g, the rest as measured) are
  kept in each row's `unfused`.

It is a best case: it holds only if the FP8 GEMMs reach the same fraction of their ceiling as the
bf16 GEMMs of theirs (both taken as 100%), the casts run at copy bandwidth and cost no launch
gaps, and nothing else in the step changes. `cast_ms_if_issue_bound` is the casts' time if every
pass takes the longer of its bytes and its sm_90 instructions at ISSUE_RATE: the fused GELU casts
(about 28 and 36 instructions per element, bench/results/aot/README.md) sit near the balance.
`speedup_if_gemms_at` shows the one assumption that cuts the other way: bf16 GEMMs below their
ceiling leave less non-GEMM time and FP8 (at the same fraction) saves more.
`remainder_ms_for_target` is the non-GEMM time of the bf16 step at which FP8 would reach issue
23's 1.3x (negative: out of reach),
`remainder_ms_for_tokens_target` the one at which the FP8 step would reach its 250k real tokens/s
(both with the bias-GELU bytes taken out of the FP8 step's rest, as above).

The bf16 step is the `torch` backend's by default, the fastest measured so far. e2e's fp8 rows run
the fast backend's packed step, whose bf16 twin (`fast_packed`) has no GPU figure yet: once it has,
`--provider fast_packed` predicts against the step issue 23's 1.3x is measured from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from e2e import VOCAB, predictions
from e2e import bench as e2e_bench
from harness import BENCH_DIR

from bert_fast.fileio import atomic_write_text
from bert_fast.kernels.fp8_cast_aot import row_key
from bert_fast.model.config import BertConfig
from bert_fast.ops.fp8 import GEMMS
from bert_fast.train.flops import step_flops

DEFAULT_RESULTS = BENCH_DIR / "results" / "nvidia-h200"
CAST_REPORT = BENCH_DIR / "results" / "aot" / "fp8_cast.json"
SCALINGS = ("delayed", "current")
GRAD_FORMAT = "e5m2"  # Fp8Recipe's default gradient format
TARGET_SPEEDUP = 1.3  # issue 23: fp8 >= 1.3x bf16 end to end
TARGET_TOKENS_S = 250e3  # issue 23: real tokens/s per H200 at seq 512 (with the graphed step)
GEMM_FRACTIONS = (0.9, 0.8, 0.7)
# kernels/fp8_cast.py _cast: amax, cast; under delayed scaling the cast alone once the state is
# primed (every step but the first; train.compile runs its first two eagerly, then compiles primed),
# its last program finishing
LAUNCHES_PER_CAST = {"delayed": 1, "current": 2}
# What the bf16 bias + GELU moves per [tokens, 4H] element (assumed inside the measured rest):
# forward read y + write h, backward read dh and y + write g, bias-gradient sum read g.
BIAS_GELU_BYTES = (2 + 2) + (2 + 2 + 2) + 2
# Thread-instructions an H100/H200 issues per second (132 SMs x 4 schedulers x 1 warp-instruction
# per clock x ~1.7 GHz x 32 threads): with the AOT report's instructions per element, the time a
# cast pass takes if it is issue- rather than memory-bound (tests/test_fp8_cast_aot.py's figure).
ISSUE_RATE = 28e12


def layer_gemms(config: BertConfig, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(M, N, K) of each FP8 GEMM of one encoder layer over `tokens` rows: x [M, K] @ W[N, K]^T."""
    h, i = config.hidden_size, config.intermediate_size
    return {"qkv": (tokens, 3 * h, h), "attn_out": (tokens, h, h), "ffn_in": (tokens, i, h),
            "ffn_out": (tokens, h, i)}


def fp8_gemm_flops(config: BertConfig, tokens: int) -> float:
    """FLOPs of the encoder's FP8 GEMMs in one step: y = xW^T, dX = dY W, dW = dY^T x, each 2MNK."""
    per_layer = sum(3 * 2 * m * n * k for m, n, k in layer_gemms(config, tokens).values())
    return config.num_hidden_layers * per_layer


def cast_elements(config: BertConfig, tokens: int) -> dict[str, int]:
    """Elements cast to FP8 in one step (one optimizer step): inputs x, output gradients dY, weights W."""
    shapes = layer_gemms(config, tokens).values()
    layers = config.num_hidden_layers
    return {"inputs": layers * sum(m * k for m, n, k in shapes),
            "gradients": layers * sum(m * n for m, n, k in shapes),
            "weights": layers * sum(n * k for m, n, k in shapes)}


def ffn_elements(config: BertConfig, tokens: int) -> int:
    """Elements of the FFN's [tokens, intermediate] activation, all layers: what ffn_out's input cast
    and ffn_in's output-gradient cast cover, and what the bias + GELU reads and writes."""
    return config.num_hidden_layers * tokens * config.intermediate_size


def cast_passes(report: list[dict], scaling: str, fp8: str, prologue: str = "-") -> list[dict]:
    """The AOT report's rows of what casting a bf16 element costs under `scaling`: the cast pass
    writing both layouts, plus the amax pass under current scaling (under delayed scaling a
    primed state's casts run none). `prologue` "gelu" / "gelu_grad": the casts with
    the FFN's bias + GELU (its gradient) fused in, which read y (dh and y)."""
    rows = {row_key(r): r for r in report}
    keys = [("cast", "bf16", fp8, scaling, "both", prologue)]
    if scaling == "current":
        keys.append(("amax", "bf16", "-", scaling, "-", prologue))
    try:
        return [rows[k] for k in keys]
    except KeyError as err:
        raise ValueError(f"{CAST_REPORT.name} has no row {err}: rerun bench/fp8_cast.py "
                         "--compile-report") from None


def cast_bytes_per_element(report: list[dict], scaling: str, fp8: str, prologue: str = "-") -> int:
    """Bytes a bf16 element costs to cast (`cast_passes`)."""
    return sum(r["bytes_per_element"] for r in cast_passes(report, scaling, fp8, prologue))


def cast_ns_per_element(report: list[dict], scaling: str, fp8: str, copy_gbs: float,
                        prologue: str = "-") -> float:
    """Nanoseconds a bf16 element costs to cast when each pass (`cast_passes`) takes the longer of
    its bytes at `copy_gbs` and its sm_90 instructions at ISSUE_RATE."""
    return sum(max(r["bytes_per_element"] / copy_gbs, r["instructions_per_element"] / ISSUE_RATE * 1e9)
               for r in cast_passes(report, scaling, fp8, prologue))


def _bf16_row(e2e: dict, case: dict, provider: str, path: Path) -> dict:
    want = (case["model"], case["seq"], case["batch"], provider, "full", "ok")
    for row in e2e["rows"]:  # rows from before e2e's `lengths` column are full-length
        if (row["model"], row["seq"], row["batch"], row["provider"], row.get("lengths", "full"),
                row["status"]) == want:
            return row
    raise ValueError(f"{path} has no ok row for provider {provider!r} at {case['model']} seq {case['seq']} "
                     f"batch {case['batch']} (full-length)")


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _speedup(bf16_gemm_ms: float, fp8_gemm_ms: float, cast_ms: float, bf16_step_ms: float,
             fraction: float, saved_ms: float = 0.0) -> float:
    """bf16 step / fp8 step when both GEMM kinds run at `fraction` of their ceiling; `saved_ms` of the
    rest (the fused bias + GELU's bytes) does not run in the fp8 step."""
    remainder = bf16_step_ms - bf16_gemm_ms / fraction
    return bf16_step_ms / (remainder - saved_ms + fp8_gemm_ms / fraction + cast_ms)


def predict_case(case: dict, bf16_ms: float, ceilings: dict, report: list[dict], scaling: str) -> dict:
    config = BertConfig.from_preset(case["model"], vocab_size=VOCAB)
    tokens = case["batch"] * case["seq"]
    total = step_flops(config, [case["seq"]] * case["batch"], case["batch"] * predictions(case["seq"]))
    gemm = fp8_gemm_flops(config, tokens)
    bf16_tflops = ceilings["bf16_matmul_tflops"]
    fp8_tflops = ceilings.get("fp8_matmul_tflops") or 2 * bf16_tflops
    bf16_gemm_ms = gemm / bf16_tflops / 1e9
    fp8_gemm_ms = gemm / fp8_tflops / 1e9
    elements = cast_elements(config, tokens)

    def per(fp8: str, prologue: str = "-") -> int:
        return cast_bytes_per_element(report, scaling, fp8, prologue)

    unfused_bytes = ((elements["inputs"] + elements["weights"]) * per("e4m3")
                     + elements["gradients"] * per(GRAD_FORMAT))
    # Fused: ffn_out's input h and ffn_in's output gradient g are cast by the GELU rows instead.
    ffn = ffn_elements(config, tokens)
    cast_bytes = (unfused_bytes + ffn * (per("e4m3", "gelu") - per("e4m3"))
                  + ffn * (per(GRAD_FORMAT, "gelu_grad") - per(GRAD_FORMAT)))
    gelu_bytes = ffn * BIAS_GELU_BYTES
    cast_ms, unfused_cast_ms, gelu_ms = (b / ceilings["copy_gbs"] / 1e6
                                         for b in (cast_bytes, unfused_bytes, gelu_bytes))
    def ns(fp8: str, prologue: str = "-") -> float:
        return cast_ns_per_element(report, scaling, fp8, ceilings["copy_gbs"], prologue)

    # The casts' time if each pass takes the longer of its bytes and its instructions.
    issue_cast_ms = ((elements["inputs"] + elements["weights"] - ffn) * ns("e4m3")
                     + ffn * ns("e4m3", "gelu") + (elements["gradients"] - ffn) * ns(GRAD_FORMAT)
                     + ffn * ns(GRAD_FORMAT, "gelu_grad")) / 1e6
    remainder_ms = bf16_ms - bf16_gemm_ms
    fp8_ms = remainder_ms - gelu_ms + fp8_gemm_ms + cast_ms
    unfused_ms = remainder_ms + fp8_gemm_ms + unfused_cast_ms
    # (G_bf16 + R) / (G_fp8 + cast + R - gelu) = target, solved for R.
    needed = (bf16_gemm_ms - TARGET_SPEEDUP * (fp8_gemm_ms + cast_ms - gelu_ms)) / (TARGET_SPEEDUP - 1)
    row = {"model": case["model"], "seq": case["seq"], "batch": case["batch"], "scaling": scaling,
           "real_tokens": tokens, "step_tflop": total / 1e12, "fp8_gemm_tflop": gemm / 1e12,
           "other_tflop": (total - gemm) / 1e12, "fp8_gemm_share": gemm / total,
           "bf16_step_ms": bf16_ms, "bf16_gemm_ms": bf16_gemm_ms, "remainder_ms": remainder_ms,
           "fp8_gemm_ms": fp8_gemm_ms, "cast_gb": cast_bytes / 1e9, "cast_ms": cast_ms,
           "cast_ms_if_issue_bound": issue_cast_ms,
           "bias_gelu_gb": gelu_bytes / 1e9, "bias_gelu_ms": gelu_ms,
           "fp8_remainder_ms": remainder_ms - gelu_ms,
           # three operands per GEMM (x, W, dY), each cast in LAUNCHES_PER_CAST kernels
           "cast_launches": 3 * config.num_hidden_layers * len(GEMMS) * LAUNCHES_PER_CAST[scaling],
           "fp8_step_ms": fp8_ms, "speedup": bf16_ms / fp8_ms, "bf16_tokens_s": tokens / bf16_ms * 1e3,
           "fp8_tokens_s": tokens / fp8_ms * 1e3, "remainder_ms_for_target": needed,
           "remainder_ms_for_tokens_target": tokens / TARGET_TOKENS_S * 1e3 - fp8_gemm_ms - cast_ms + gelu_ms,
           "speedup_if_gemms_at": {str(f): _speedup(bf16_gemm_ms, fp8_gemm_ms, cast_ms, bf16_ms, f, gelu_ms)
                                   for f in GEMM_FRACTIONS},
           # the FFN's bias + GELU as separate bf16 kernels (in the rest) and plain casts of h and g
           "unfused": {"cast_gb": unfused_bytes / 1e9, "cast_ms": unfused_cast_ms, "fp8_step_ms": unfused_ms,
                       "speedup": bf16_ms / unfused_ms, "fp8_tokens_s": tokens / unfused_ms * 1e3}}
    return {k: _round(v) if isinstance(v, float) else
            ({f: _round(s) for f, s in v.items()} if isinstance(v, dict) else v) for k, v in row.items()}


def predict(results: Path, provider: str = "torch", cast_report: Path = CAST_REPORT) -> dict:
    """The prediction from results/ceilings.json, results/e2e.json and the cast report."""
    paths = {"ceilings": results / "ceilings.json", "e2e": results / "e2e.json", "cast_report": cast_report}
    for name, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} not found")
    ceilings, e2e, report = (json.loads(p.read_text()) for p in paths.values())
    for key in ("bf16_matmul_tflops", "copy_gbs"):
        if not ceilings.get(key):
            raise ValueError(f"{paths['ceilings']}: {key} is not measured there ({ceilings.get(key)!r})")
    measured_fp8 = ceilings.get("fp8_matmul_tflops")
    cases = [c for c in e2e_bench.gpu_cases if c["model"] == "large" and c["lengths"] == "full"]
    rows = [predict_case(c, _bf16_row(e2e, c, provider, paths["e2e"])["ms"], ceilings, report, s)
            for c in cases for s in SCALINGS]
    return {"inputs": {"ceilings": _relative(paths["ceilings"]), "e2e": _relative(paths["e2e"]),
                       "cast_report": _relative(cast_report), "device": ceilings["meta"]["device"],
                       "e2e_commit": e2e["meta"]["commit"], "bf16_provider": provider,
                       "bf16_matmul_tflops": _round(ceilings["bf16_matmul_tflops"]),
                       "fp8_matmul_tflops": _round(measured_fp8 or 2 * ceilings["bf16_matmul_tflops"]),
                       "fp8_matmul_source": "measured (ceilings.json)" if measured_fp8 else
                       "assumed: 2x the measured bf16 (the datasheet ratio) until ceilings.json has "
                       "fp8_matmul_tflops",
                       "copy_gbs": _round(ceilings["copy_gbs"]), "grad_format": GRAD_FORMAT},
            "bound": "best case: FP8 and bf16 GEMMs at the same fraction (100%) of their ceilings, casts at "
                     "copy bandwidth without launch gaps, the rest of the step unchanged but for the FFN's "
                     "bias + GELU (12 bytes per [tokens, 4H] element at copy bandwidth), fused into the "
                     "casts",
            "rows": rows}


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(BENCH_DIR.parent))
    except ValueError:
        return str(path)


COLUMNS = ("seq", "batch", "scaling", "FP8 GEMM share of FLOPs", "bf16 ms (GEMM + rest)",
           "fp8 ms (GEMM + casts + rest - bias-GELU)", "speedup", "fp8 tokens/s",
           "unfused: fp8 ms (casts), speedup, tokens/s", "rest for 1.3x, ms", "rest for 250k tokens/s, ms",
           "speedup, GEMMs at 80%", "casts if issue-bound, ms")


def _cells(r: dict) -> tuple:
    u = r["unfused"]
    return (r["seq"], r["batch"], r["scaling"], f"{100 * r['fp8_gemm_share']:.1f}%",
            f"{r['bf16_step_ms']:.1f} ({r['bf16_gemm_ms']:.1f} + {r['remainder_ms']:.1f})",
            f"{r['fp8_step_ms']:.1f} ({r['fp8_gemm_ms']:.1f} + {r['cast_ms']:.1f} + {r['remainder_ms']:.1f} "
            f"- {r['bias_gelu_ms']:.1f})",
            f"{r['speedup']:.2f}x", f"{r['fp8_tokens_s'] / 1e3:.0f}k",
            f"{u['fp8_step_ms']:.1f} ({u['cast_ms']:.1f}), {u['speedup']:.2f}x, "
            f"{u['fp8_tokens_s'] / 1e3:.0f}k",
            f"{r['remainder_ms_for_target']:.1f}", f"{r['remainder_ms_for_tokens_target']:.1f}",
            f"{r['speedup_if_gemms_at']['0.8']:.2f}x", f"{r['cast_ms_if_issue_bound']:.1f}")


def markdown(prediction: dict) -> str:
    i, bound = prediction["inputs"], prediction["bound"]
    intro = (f"Static prediction for issue 23 from the {i['device']} bf16 step (`{i['bf16_provider']}` "
             f"rows of {i['e2e']}, commit {i['e2e_commit']}): bf16 matmul {i['bf16_matmul_tflops']:.0f} "
             f"TFLOP/s, fp8 {i['fp8_matmul_tflops']:.0f} ({i['fp8_matmul_source']}), copy "
             f"{i['copy_gbs']:.0f} GB/s. {bound[0].upper()}{bound[1:]}.")
    table = [f"| {' | '.join(COLUMNS)} |", f"|{'---|' * len(COLUMNS)}"]
    table += [f"| {' | '.join(str(c) for c in _cells(r))} |" for r in prediction["rows"]]
    return "\n".join(["# fp8_prediction", "", intro, "", *table]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                   help="folder with ceilings.json and e2e.json")
    p.add_argument("--provider", default="torch", help="the e2e.json bf16 row FP8 is applied to")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: --results)")
    args = p.parse_args(argv)
    prediction = predict(args.results, args.provider)
    out = args.out or args.results
    atomic_write_text(out / "fp8_prediction.json", json.dumps(prediction, indent=1) + "\n")
    atomic_write_text(out / "fp8_prediction.md", markdown(prediction))
    for r in prediction["rows"]:
        print(f"fp8_prediction: seq {r['seq']} {r['scaling']}: {r['fp8_step_ms']:.1f} ms, "
              f"{r['speedup']:.2f}x bf16, {r['fp8_tokens_s']:.0f} tokens/s (unfused GELU: "
              f"{r['unfused']['fp8_step_ms']:.1f} ms, {r['unfused']['speedup']:.2f}x)")
    return prediction


if __name__ == "__main__":
    main()
