"""The device's two measured ceilings, which every kernel figure is read against: device-to-device
copy bandwidth (GB/s, read + write) and dense bf16 matmul throughput (TFLOP/s at 8192^3).

    python bench/ceilings.py [--out DIR]

Writes ceilings.json and ceilings.md under bench/results/<device>/ (or DIR). On the CPU there is
nothing to measure: it says so and writes the stamp only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from harness import BENCH_DIR, copy_bandwidth_gbs, device_slug, matmul_tflops, stamp

from bert_fast.fileio import atomic_write_text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result = {"meta": stamp(device, torch.bfloat16), "copy_gbs": copy_bandwidth_gbs(str(device)),
              "bf16_matmul_tflops": matmul_tflops(str(device), "bf16"),
              "fp16_matmul_tflops": matmul_tflops(str(device), "fp16")}
    if device.type != "cuda":
        print("ceilings: no CUDA device, nothing to measure (CPU figures are ratios to eager)")
    else:
        print(f"ceilings: copy {result['copy_gbs']:.0f} GB/s, bf16 matmul "
              f"{result['bf16_matmul_tflops']:.0f} TFLOP/s, fp16 {result['fp16_matmul_tflops']:.0f}")
    out = args.out or BENCH_DIR / "results" / device_slug(device)
    atomic_write_text(out / "ceilings.json", json.dumps(result, indent=1))
    fmt = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    atomic_write_text(out / "ceilings.md", (
        f"# ceilings\n\nDevice: {result['meta']['device']} · torch {result['meta']['torch']} · "
        f"commit {result['meta']['commit']} · {result['meta']['date']}\n\n"
        "| copy GB/s (read+write) | bf16 matmul TFLOP/s (8192^3) | fp16 matmul TFLOP/s |\n|---|---|---|\n"
        f"| {fmt(result['copy_gbs'])} | {fmt(result['bf16_matmul_tflops'])} | "
        f"{fmt(result['fp16_matmul_tflops'])} |\n"))
    return result


if __name__ == "__main__":
    main()
