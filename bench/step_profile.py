"""Where one training step's time goes: a per-kernel profile of bench/e2e.py's step (its providers,
batches and optimizer), the kernels sorted into categories by bench/kernel_categories.py.

    python bench/step_profile.py                 # GPU: BERT-large, seq 128 x 128 and 512 x 32, full length
    python bench/step_profile.py --quick         # the first case, fewer steps
    python bench/step_profile.py --providers fast_graphed --seq 512 --batch 32
    python bench/step_profile.py --device cpu    # BERT-tiny: CPU ops stand in for kernels (tests)

Per case and provider (default fast_packed, fast_packed_fp8 and torch; one that cannot run here
gets a row saying why): `--warmup` steps (the first builds the model and runs two), `--steps`
timed steps (`ms`: their median, 20th-80th percentile, by CUDA events or perf_counter), then
`--steps` steps under torch.profiler (CUDA activity on a GPU, CPU activity on the CPU). Per step:
`wall_ms` of the profiled steps, `busy_ms` (the union of the kernels' intervals), `idle_ms` (wall -
busy: launch gaps, host work, syncs), `launches`, and per category its ms, % and launches, the 15
longest kernels and the 10 longest unmatched names. `non_gemm_ms` (wall - GEMM kernels) is what
bench/fp8_prediction.py calls the rest. On the CPU the "kernels" are each thread's top-level ops.
Writes step_profile.json and .md under bench/results/<device>/ (or --out) after every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from e2e import bench as e2e_bench
from e2e import make_inputs
from harness import BENCH_DIR, DTYPES, device_slug, failures_recorded, stamp
from kernel_categories import kernels_from_events, summarize
from step_profile_report import describe, markdown

from bert_fast.fileio import atomic_write_text
from bert_fast.model.config import PRESETS

GPU_CASES = [c for c in e2e_bench.gpu_cases if c["model"] == "large" and c["lengths"] == "full"]
CPU_CASES = e2e_bench.cpu_cases[:1]
PROVIDERS = ("fast_packed", "fast_packed_fp8", "torch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/step_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated bench/e2e.py providers")
    p.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="one case: this preset (with the other case flags)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lengths", choices=("full", "pipeline"), default=None)
    p.add_argument("--quick", action="store_true", help="the first case, 2 warm-up and 2 profiled steps")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (2 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed and profiled steps, default 3 (2 with --quick)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<device>/)")
    p.add_argument("--strict", action="store_true", help="a provider error fails the run instead of a row")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 3)
    for name in ("warmup", "steps", "seq", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    unknown = sorted(set(args.providers.split(",")) - set(e2e_bench.providers))
    if unknown:
        p.error(f"--providers: unknown {unknown}; bench/e2e.py has {sorted(e2e_bench.providers)}")
    return args


def cases(args: argparse.Namespace, device: torch.device) -> list[dict]:
    chosen = list(GPU_CASES if device.type == "cuda" else CPU_CASES)
    given = {k: getattr(args, k) for k in ("model", "seq", "batch", "lengths")
             if getattr(args, k) is not None}
    if given:
        chosen = [dict(chosen[0], **given)]
    return chosen[:1] if args.quick else chosen


def timed_steps(step, device: torch.device, n: int) -> list[float]:
    """Milliseconds of each of `n` back-to-back steps (host stalls included)."""
    if device.type != "cuda":
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    torch.cuda.synchronize(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    for event in events[1:]:
        step()
        event.record()
    events[-1].synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def profiled_steps(step, device: torch.device, n: int) -> dict:
    """`summarize` of `n` steps under torch.profiler. CUDA activity alone on a GPU: recording the CPU
    ops too would slow the host and widen the very gaps being measured."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        walls = timed_steps(step, device, n)
    kernels = kernels_from_events(prof.events(), device.type)
    if not kernels:  # else the row would read as a step that is all idle
        raise RuntimeError(f"torch.profiler recorded no {device.type} kernels (is CUPTI available?)")
    return summarize(kernels, sum(walls), n)


def profile_provider(name: str, case: dict, shared: dict, device: torch.device, args) -> dict:
    """The row of one provider: its own model and optimizer state on the case's shared batch."""
    inputs = dict(shared, state={}, row=dict(shared["row"]))  # e2e keeps a provider's model in "state"
    provider = e2e_bench.providers[name]

    def step():
        return provider(inputs, case)

    try:
        torch.manual_seed(0)
        for _ in range(args.warmup):
            step()
        times = timed_steps(step, device, args.steps)
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
        row = {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3],
               "syncs": inputs["row"].get("syncs")}
        row.update(profiled_steps(step, device, args.steps))
        return dict(row, status="ok")
    finally:
        inputs["state"].clear()
        gc.collect()  # the model, before failures_recorded empties the device's cache


def run_one(name: str, case: dict, shared: dict, device: torch.device, args) -> dict:
    row = {**case, "provider": name, "status": "ok"}
    with failures_recorded(row, args.strict, device):
        row.update(profile_provider(name, case, shared, device, args))
    return row


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    atomic_write_text(out / "step_profile.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    atomic_write_text(out / "step_profile.md", markdown(meta, rows))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    meta = dict(stamp(device, dtype), warmup=args.warmup, steps=args.steps)
    out = args.out or BENCH_DIR / "results" / device_slug(device)
    rows: list[dict] = []
    for case in cases(args, device):
        shared = make_inputs(case, device, dtype)
        for name in args.providers.split(","):
            rows.append(run_one(name, case, shared, device, args))
            print(describe(rows[-1]), flush=True)
            write(out, meta, rows)  # after every row: a run stopped at its time limit keeps the rest
        del shared
    print(f"[step_profile] wrote {out}/step_profile.json, .md", flush=True)
    return rows


if __name__ == "__main__":
    main()
