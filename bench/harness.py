"""The one benchmark harness every `bench/<op>.py` uses; each script only declares its cases,
inputs and providers.

Timing: on CUDA `triton.testing.do_bench` (median with 20/80 quantiles, gradients of the leaves
reset between runs); on the CPU a median of repeated `time.perf_counter` runs. Every provider runs
in the same process on the same inputs as the baseline. A row records time, TFLOP/s and GB/s
from the formulas the script gives, the share of the device's measured copy bandwidth, the speedup
over the baseline and the peak extra memory, stamped with device, versions, commit and date.
Results go to bench/results/<device>/<name>.{json,md,png} (or `--out DIR`).

Modes: `forward` times the provider's call; `backward` times `out.backward(grad)` on a graph
built once (retain_graph); `full` times both.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCH_DIR = Path(__file__).resolve().parent
MODES = ("forward", "backward", "full")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Unavailable(Exception):
    """Raised by a provider that cannot run here (peer not installed, needs CUDA, ...)."""


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError("a provider must return a tensor or a tuple holding one")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=(),
            min_time_s: float = 0.2, min_runs: int = 5) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of `fn`."""
    if device.type == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, grad_to_none=list(grad_to_none),
                                              quantiles=[0.5, 0.2, 0.8])
        return med, lo, hi
    fn()  # warm-up (allocations, lazy init)
    runs: list[float] = []
    start = time.perf_counter()
    while len(runs) < min_runs or time.perf_counter() - start < min_time_s:
        for leaf in grad_to_none:
            leaf.grad = None
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
        if len(runs) >= 1000:
            break
    runs.sort()
    q = statistics.quantiles(runs, n=5) if len(runs) > 1 else [runs[0]] * 4
    return statistics.median(runs), q[0], q[3]


def compiled(fn: Callable[..., object]) -> Callable[[dict, dict], object]:
    """A provider that runs `torch.compile(fn)(**inputs)` (CUDA only): one static-shape compile per
    case, resetting dynamo between cases so the sweep never reaches its recompile limit (past it,
    dynamo silently runs eager and the row would measure the wrong thing)."""
    state: dict = {}

    def provider(inputs: dict, case: dict):
        if any(t.device.type != "cuda" for t in inputs.values() if isinstance(t, torch.Tensor)):
            raise Unavailable("torch.compile is benchmarked on CUDA only")
        key = tuple(sorted(case.items()))
        if state.get("key") != key:
            torch._dynamo.reset()
            state.update(key=key, fn=torch.compile(fn, dynamic=False))
        return state["fn"](**inputs)

    return provider


@functools.cache
def copy_bandwidth_gbs(device_str: str) -> float | None:
    """Measured device-to-device copy GB/s (read + write), the ceiling for memory-bound kernels."""
    device = torch.device(device_str)
    if device.type != "cuda":
        return None
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


@functools.cache
def matmul_tflops(device_str: str, dtype_name: str = "bf16", size: int = 8192) -> float | None:
    """Measured dense matmul TFLOP/s at size^3, the compute ceiling."""
    device = torch.device(device_str)
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype_name])
    b = torch.randn_like(a)
    ms, _, _ = time_ms(lambda: a @ b, device)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def stamp(device: torch.device, dtype: torch.dtype) -> dict:
    """What a reader needs to trust (and reproduce) a row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@dataclasses.dataclass
class Benchmark:
    name: str
    make_inputs: Callable[[dict, torch.device, torch.dtype], dict]
    providers: dict[str, Callable[[dict, dict], object]]
    gpu_cases: list[dict]
    cpu_cases: list[dict]
    modes: tuple[str, ...] = MODES
    flops: Callable[[dict, str], float] | None = None
    bytes: Callable[[dict, str], float] | None = None
    cpu_providers: tuple[str, ...] = ("eager",)
    # Providers a GPU run takes by default, in this order (all when None); --providers names any.
    gpu_providers: tuple[str, ...] | None = None
    # A GPU run's default order: (case, provider) -> priority, lower first (case by case when None),
    # so the rows that matter most are measured before a time limit cuts the run.
    gpu_priority: Callable[[dict, str], int] | None = None
    baseline: str = "eager"
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None
    # Extra columns of a measured row (seq/s, MFU, ...): derive(case, row, device) -> dict.
    derive: Callable[[dict, dict, torch.device], dict] | None = None
    # Static report: the sm_90 builds of the op's kernels (no GPU needed), one dict per kernel and
    # config; `--compile-report` writes them to bench/results/aot/<name>.json.
    aot_report: Callable[[], list[dict]] | None = None
    description: str = ""
    # How many of the GPU cases (in the order given) --quick runs; of the CPU cases, two.
    quick_gpu_cases: int = 2
    args: argparse.Namespace | None = None

    # ---- command line -------------------------------------------------------------------------
    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"bench/{self.name}.py", description=self.description)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="default: bf16 on CUDA, fp32 on the CPU")
        p.add_argument("--cases", choices=("cpu", "gpu"), default=None,
                       help="which size list to run (default: by device)")
        p.add_argument("--quick", action="store_true",
                       help=f"the first {self.quick_gpu_cases} GPU cases only (CPU: 2)")
        p.add_argument("--providers", default=None, help="comma-separated subset")
        p.add_argument("--modes", default=None, help=f"comma-separated subset of {self.modes}")
        p.add_argument("--out", type=Path, default=None,
                       help="results folder (default: bench/results/<device>/)")
        p.add_argument("--strict", action="store_true",
                       help="a provider error fails the run instead of being recorded")
        if self.aot_report:
            p.add_argument("--compile-report", action="store_true",
                           help="build the kernels for sm_90 (no GPU needed), write "
                                f"bench/results/aot/{self.name}.json (or --out DIR) and print the table")
        if self.extra_args:
            self.extra_args(p)
        return p

    def main(self, argv: list[str] | None = None) -> list[dict]:
        self.args = self.parser().parse_args(argv)
        if getattr(self.args, "compile_report", False):
            rows = self.aot_report()
            write_aot_report(self.name, rows, self.args.out)
            return rows
        rows = self.run(self.args)
        return rows

    # ---- running ------------------------------------------------------------------------------
    def _selected(self, args, device) -> tuple[list[str], list[dict], list[str]]:
        names = list(self.providers)
        if args.providers:
            wanted = args.providers.split(",")
            unknown = sorted(set(wanted) - set(names))
            if unknown:
                raise SystemExit(f"--providers: unknown {unknown}; known: {names}")
            names = [n for n in names if n in wanted]
        elif device.type == "cuda" and self.gpu_providers is not None:
            names = [n for n in self.gpu_providers if n in names]  # in the order given: of value
        if device.type != "cuda":
            dropped = [n for n in names if n not in self.cpu_providers]
            names = [n for n in names if n in self.cpu_providers]
            if dropped:
                print(f"[{self.name}] CPU: running the torch reference only ({', '.join(names)}); "
                      f"{', '.join(dropped)} need CUDA", flush=True)
        kind = args.cases or ("gpu" if device.type == "cuda" else "cpu")
        cases = self.gpu_cases if kind == "gpu" else self.cpu_cases
        if args.quick:
            cases = cases[:self.quick_gpu_cases if kind == "gpu" else 2]
        modes = args.modes.split(",") if args.modes else list(self.modes)
        bad = sorted(set(modes) - set(self.modes))
        if bad:
            raise SystemExit(f"--modes: unknown {bad}; this benchmark has {self.modes}")
        return names, cases, modes

    def _measure(self, provider, inputs, case, mode, device) -> dict:
        leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        call = functools.partial(provider, inputs, case)
        if mode not in ("backward", "full"):  # forward, or a whole step (bench/e2e.py, optim.py)
            fn = call
        else:
            out = _first_tensor(call())
            grad = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
            if mode == "backward":
                def fn():
                    out.backward(grad, retain_graph=True)
            else:
                def fn():
                    _first_tensor(call()).backward(grad)
        for leaf in leaves:
            leaf.grad = None
        peak_mb = None
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            peak_mb = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        med, lo, hi = time_ms(fn, device, grad_to_none=leaves)
        # A provider may leave columns of its own (bench/e2e.py: real tokens, syncs per step).
        return {"ms": med, "ms_p20": lo, "ms_p80": hi, "peak_mb": peak_mb, **inputs.get("row", {})}

    def _plan(self, args, device, names, cases, modes) -> list[tuple[int, dict, str, str]]:
        """(case index, case, mode, provider) in the order to run: case by case, each mode's
        providers in turn, or on a GPU's default run by `gpu_priority` first (stably: the usual
        order within a priority)."""
        plan = [(i, case, mode, name) for i, case in enumerate(cases) for mode in modes for name in names]
        if device.type == "cuda" and self.gpu_priority is not None and not args.providers:
            plan.sort(key=lambda entry: self.gpu_priority(entry[1], entry[3]))
        return plan

    def _measured(self, name, case, mode, device, dtype) -> dict:
        torch.manual_seed(0)
        inputs = self.make_inputs(case, device, dtype)  # freed on return, before the cache is emptied
        return self._measure(self.providers[name], inputs, case, mode, device)

    def _row(self, name, case, mode, device, dtype, args, bandwidth) -> dict:
        row = {**case, "mode": mode, "provider": name, "status": "ok"}
        with failures_recorded(row, args.strict, device):
            row.update(self._measured(name, case, mode, device, dtype))
        if row["status"] == "ok":
            seconds = row["ms"] * 1e-3
            if self.flops:
                row["tflops"] = self.flops(case, mode) / seconds / 1e12
            if self.bytes:
                row["gbs"] = self.bytes(case, mode) / seconds / 1e9
                if bandwidth:
                    row["pct_bandwidth"] = 100 * row["gbs"] / bandwidth
            if self.derive:
                row.update(self.derive(case, row, device))
        return row

    def run(self, args: argparse.Namespace) -> list[dict]:
        device = torch.device(args.device)
        dtype = DTYPES[args.dtype] if args.dtype else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        names, cases, modes = self._selected(args, device)
        meta = stamp(device, dtype)
        bandwidth = copy_bandwidth_gbs(str(device))
        meta["copy_gbs"] = bandwidth
        out_dir = args.out or BENCH_DIR / "results" / device_slug(device)
        # Rows by where they stand in the tables (case, mode, provider), whatever order they ran in.
        place = {(i, mode, name): n for n, (i, mode, name) in
                 enumerate((i, mode, name) for i in range(len(cases)) for mode in modes for name in names)}
        done: dict[tuple, dict] = {}
        for i, case, mode, name in self._plan(args, device, names, cases, modes):
            row = done[i, mode, name] = self._row(name, case, mode, device, dtype, args, bandwidth)
            print(f"[{self.name}] {_describe(row)}", flush=True)
            base = done.get((i, mode, self.baseline))
            if base is not None and base["status"] == "ok":  # speedup over the baseline measured beside it
                for (j, m, _), other in done.items():
                    if (j, m) == (i, mode) and other.get("ms"):
                        other["x_baseline"] = base["ms"] / other["ms"]
            rows = [done[key] for key in sorted(done, key=place.__getitem__)]
            # After every row, so a run stopped at its time limit (bench/gpu_suite.sh gives each
            # benchmark one) still leaves what it measured.
            write_results(out_dir, self.name, meta, rows, baseline=self.baseline, final=False)
        rows = [done[key] for key in sorted(done, key=place.__getitem__)]
        write_results(out_dir, self.name, meta, rows, baseline=self.baseline)
        return rows


@contextlib.contextmanager
def failures_recorded(row: dict, strict: bool, device: torch.device):
    """Why a provider gave no row goes in row["status"] (unavailable, out of memory, or the error,
    raised instead when `strict`): one broken peer must not cost the other rows. The device's
    cached memory is freed after each provider either way."""
    try:
        yield
    except Unavailable as why:
        row["status"] = f"unavailable: {why}"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as err:
        if strict:
            raise
        row["status"] = f"error: {type(err).__name__}: {err}"[:300]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


class SyncCounter:
    """Counts device-to-host reads inside the block (`with SyncCounter(device) as c: ...;
    c.count`). On CUDA, torch's sync debug mode reports every synchronising call, compiled code
    included. On the CPU nothing synchronises, so the calls that would on a GPU are counted:
    `.item()`, `bool()` (aten._local_scalar_dense), `.tolist()`, and ops whose output shape
    depends on values (nonzero, masked_select, unique); code compiled with fullgraph=True has
    none (a read would have broken its graph), and a dispatch mode would stop it compiling, so
    there `count` stays None."""

    SHAPE_FROM_VALUES = ("nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive")

    def __init__(self, device: torch.device, compiled: bool = False):
        self.device, self.compiled, self.count = torch.device(device), compiled, None

    def __enter__(self):
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._seen = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif not self.compiled:
            self.count, counter = 0, self

            class Mode(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    name = func.overloadpacket.__name__
                    if name == "_local_scalar_dense" or name in SyncCounter.SHAPE_FROM_VALUES:
                        counter.count += 1
                    return func(*args, **(kwargs or {}))

            self._tolist = torch.Tensor.tolist

            def tolist(tensor):
                counter.count += 1
                return counter._tolist(tensor)

            torch.Tensor.tolist = tolist
            self._mode = Mode()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message) for w in self._seen)
            self._warnings.__exit__(*exc)
        elif not self.compiled:
            self._mode.__exit__(*exc)
            torch.Tensor.tolist = self._tolist
        return False


def _describe(row: dict) -> str:
    parts = [f"{k}={_fmt(v)}" for k, v in row.items() if k not in
             ("ms", "ms_p20", "ms_p80", "peak_mb", "tflops", "gbs", "pct_bandwidth", "status")]
    if row["status"] != "ok":
        return " ".join(parts) + f" -> {row['status']}"
    extra = "".join(f" {k}={row[k]:.1f}" for k in ("tflops", "gbs") if k in row)
    return " ".join(parts) + f" -> {row['ms']:.3f} ms{extra}"


# ---- output ------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(meta: dict, rows: list[dict], baseline: str) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and k not in ("ms_p20", "ms_p80")]
    lines = [f"Device: {meta['device']} · dtype {meta['dtype']} · torch {meta['torch']} · triton "
             f"{meta['triton']} · commit {meta['commit']} · {meta['date']}"
             + (f" · measured copy bandwidth {meta['copy_gbs']:.0f} GB/s" if meta.get("copy_gbs") else ""),
             "", f"Times are medians (20th-80th percentile); x_baseline = {baseline} time / this time.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for col in columns:
            if col == "ms" and "ms" in row:
                cells.append(f"{row['ms']:.3f} ({row['ms_p20']:.3f}-{row['ms_p80']:.3f})")
            else:
                cells.append(_fmt(row.get(col)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, name: str, rows: list[dict]) -> bool:
    """One panel per mode: time of each provider over the cases. False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    if not modes:
        return False
    skip = {"mode", "provider", "status", "ms", "ms_p20", "ms_p80", "peak_mb", "tflops", "gbs",
            "pct_bandwidth", "x_baseline"}
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for provider in dict.fromkeys(r["provider"] for r in ok):
            pts = [r for r in ok if r["mode"] == mode and r["provider"] == provider]
            labels = [",".join(f"{v}" for k, v in r.items() if k not in skip) for r in pts]
            ax.plot(labels, [r["ms"] for r in pts], marker="o", label=provider)
        ax.set_title(f"{name}: {mode}")
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(out_dir: Path, name: str, meta: dict, rows: list[dict], baseline: str,
                  final: bool = True) -> None:
    """JSON + markdown (and, when `final`, the plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from bert_fast.fileio import atomic_write_text

    atomic_write_text(out_dir / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    atomic_write_text(out_dir / f"{name}.md", f"# {name}\n\n" + markdown_table(meta, rows, baseline))
    if not final:
        return
    plotted = plot(out_dir / f"{name}.png", name, rows)
    print(f"[{name}] wrote {out_dir}/{name}.json, .md" + (", .png" if plotted else
          " (no plot: matplotlib is not installed)"), file=sys.stderr)


# Columns of a static report that describe the build, not the configuration: a dropout row's twin
# is the row equal to it in every other column, with dropout off.
_BUILD_COLUMNS = ("dropout", "registers", "spills", "shared_bytes", "uses_wgmma",
                  "instructions_per_iteration", "mma_loops")


def dropout_ratios(rows: list[dict]) -> list[float | None]:
    """instructions_per_iteration of each dropout row over its no-dropout twin's (None if none)."""
    def config(row):
        return tuple((k, v) for k, v in row.items() if k not in _BUILD_COLUMNS)

    twins = {config(r): r["instructions_per_iteration"] for r in rows if not r.get("dropout")}
    return [r["instructions_per_iteration"] / twins[config(r)]
            if r.get("dropout") and twins.get(config(r)) else None for r in rows]


def write_aot_report(name: str, rows: list[dict], out_dir: Path | None = None) -> Path:
    """bench/results/aot/<name>.json (written to a temporary name, then renamed) and its table."""
    path = (Path(out_dir) if out_dir else BENCH_DIR / "results" / "aot") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)
    columns = [c for c in rows[0] if c != "mma_loops"] + ["x no-dropout"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row, ratio in zip(rows, dropout_ratios(rows)):
        cells = [row[c] for c in columns[:-1]] + [f"{ratio:.2f}" if ratio else ""]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"wrote {path}")
    return path
