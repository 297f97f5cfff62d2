"""The device's measured ceilings, which every kernel figure is read against: device-to-device
copy bandwidth (GB/s, read + write) and dense matmul throughput (TFLOP/s at 8192^3) in bf16, fp16
and FP8 (`torch._scaled_mm`, e4m3 x e4m3 -> bf16 under per-tensor scales, as bert_fast/ops/fp8.py
calls it; only on GPUs with FP8 tensor cores, compute capability >= 8.9, else null with the reason).

    python bench/ceilings.py [--out DIR]

Writes ceilings.json and ceilings.md under bench/results/<device>/ (or DIR). On the CPU there is
nothing to measure: it says so and writes the stamp only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from harness import BENCH_DIR, copy_bandwidth_gbs, device_slug, matmul_tflops, stamp, time_ms

from bert_fast.fileio import atomic_write_text

E4M3 = torch.float8_e4m3fn


def fp8_unavailable(device: torch.device) -> str | None:
    """Why the FP8 matmul ceiling cannot be measured on `device` (no FP8 tensor cores), or None."""
    if device.type != "cuda":
        return f"no FP8 tensor cores on {device.type} (they need a CUDA GPU of compute capability >= 8.9)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"no FP8 tensor cores: {torch.cuda.get_device_name(device)} is compute capability "
                f"{major}.{minor}, FP8 needs >= 8.9")
    return None


def fp8_operands(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """e4m3 operands of a size^3 FP8 GEMM as bert_fast/ops/fp8.py hands them to `_scaled_mm`:
    a row-major, b column-major (the transpose of a row-major tensor, which `_scaled_mm` requires
    of its second operand), and 0-d float32 per-tensor scales."""
    a = torch.randn(size, size, device=device).to(E4M3)
    b = torch.randn(size, size, device=device).to(E4M3).t()
    return a, b, torch.ones((), device=device), torch.ones((), device=device)


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               fast_accum: bool = False) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) in bf16; the call form works on torch 2.11 and 2.13 alike
    (scales positional, out_dtype and use_fast_accum keywords). bert_fast/ops/fp8.py leaves
    use_fast_accum at False: Hopper's FP8 tensor cores then promote partial sums to float32 as
    they go; with it on they keep them at the cores' own narrower precision, faster."""
    return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def fp8_matmul_tflops(device: torch.device, size: int = 8192, fast_accum: bool = False) -> float:
    """Measured dense FP8 matmul TFLOP/s at size^3, timed as harness.matmul_tflops times bf16."""
    a, b, scale_a, scale_b = fp8_operands(size, device)
    ms, _, _ = time_ms(lambda: fp8_matmul(a, b, scale_a, scale_b, fast_accum), device)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result = {"meta": stamp(device, torch.bfloat16), "copy_gbs": copy_bandwidth_gbs(str(device)),
              "bf16_matmul_tflops": matmul_tflops(str(device), "bf16"),
              "fp16_matmul_tflops": matmul_tflops(str(device), "fp16")}
    # Null with the reason where the device has no FP8 tensor cores (the CPU's `_scaled_mm` is a
    # naive loop: nothing to read a GPU figure against).
    # The fast-accumulation figure says what turning it on for the forward GEMMs (as Transformer
    # Engine and torchao do) would buy.
    why_not, fp8, fast = fp8_unavailable(device), None, None
    if why_not is None:
        try:
            fp8, fast = fp8_matmul_tflops(device), fp8_matmul_tflops(device, fast_accum=True)
        except RuntimeError as err:  # a torch build without FP8 GEMMs: keep the other ceilings
            why_not = f"torch._scaled_mm failed: {err}"
    result["fp8_matmul_tflops"], result["fp8_matmul_unavailable"] = fp8, why_not
    result["fp8_fast_accum_matmul_tflops"] = fast
    if device.type != "cuda":
        print("ceilings: no CUDA device, nothing to measure (CPU figures are ratios to eager)")
    else:
        print(f"ceilings: copy {result['copy_gbs']:.0f} GB/s, bf16 matmul "
              f"{result['bf16_matmul_tflops']:.0f} TFLOP/s, fp16 {result['fp16_matmul_tflops']:.0f}, "
              + (f"fp8 {why_not}" if why_not else f"fp8 {fp8:.0f} ({fast:.0f} with fast accumulation)"))
    out = args.out or BENCH_DIR / "results" / device_slug(device)
    atomic_write_text(out / "ceilings.json", json.dumps(result, indent=1))
    fmt = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    atomic_write_text(out / "ceilings.md", (
        f"# ceilings\n\nDevice: {result['meta']['device']} · torch {result['meta']['torch']} · "
        f"commit {result['meta']['commit']} · {result['meta']['date']}\n\n"
        "| copy GB/s (read+write) | bf16 matmul TFLOP/s (8192^3) | fp16 matmul TFLOP/s | "
        "fp8 matmul TFLOP/s (e4m3, `_scaled_mm`) | fp8, fast accumulation |\n|---|---|---|---|---|\n"
        f"| {fmt(result['copy_gbs'])} | {fmt(result['bf16_matmul_tflops'])} | "
        f"{fmt(result['fp16_matmul_tflops'])} | {fmt(fp8)} | {fmt(fast)} |\n"
        + (f"\nfp8: {why_not}\n" if why_not else "")))
    return result


if __name__ == "__main__":
    main()
