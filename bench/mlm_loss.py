"""MLM decoder + softmax cross-entropy over BERT's vocabulary: the fused chunked kernel
(kernels/mlm_loss.py) against eager PyTorch (linear + float32 cross_entropy, what ops.mlm_loss's
torch path does), torch.compile of the same, and Liger-Kernel's fused linear cross-entropy.

    python bench/mlm_loss.py                  # GPU: N = 4096/16384, hidden 768/1024, vocab 30522, bf16
    python bench/mlm_loss.py --device cpu     # tiny sizes, the torch reference only
    python bench/mlm_loss.py --compile-report # sm_90 builds, no GPU: writes bench/results/aot/mlm_loss.json
    python bench/mlm_loss.py --passes         # GPU: the two Triton passes alone, per tile shape, in GB/s

Liger-Kernel is optional (`pip install liger-kernel`; a row says "unavailable" without it).

Note on modes: the fused kernel and Liger compute the gradients inside the forward when the
inputs require grad (FLCE), so their `forward` time holds the three GEMMs and their `backward`
only scales stored gradients; compare `full` (forward + backward) across providers. Issue 20's
target: `full` at least torch.compile's, with no [N, V] logits kept for the backward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import Benchmark, Unavailable, copy_bandwidth_gbs, device_slug, stamp, time_ms
from harness import compiled as harness_compiled

VOCAB = 30522


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    n, h, v = case["tokens"], case["hidden"], case.get("vocab", VOCAB)
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < 0.01] = -100  # a few ignored rows, as after gathering
    return {
        "hidden": torch.randn(n, h, device=device, dtype=dtype, requires_grad=True),
        "weight": (torch.randn(v, h, device=device) * h**-0.5).to(dtype).requires_grad_(),
        "bias": torch.zeros(v, device=device, dtype=dtype, requires_grad=True),
        "labels": labels,
    }


def eager_loss(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias).float()
    count = (labels != -100).sum().clamp(min=1)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / count


def eager(inputs: dict, case: dict):
    return eager_loss(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["labels"])


compiled = harness_compiled(eager_loss)


def fused(inputs: dict, case: dict):
    if inputs["hidden"].device.type != "cuda":
        raise Unavailable("the Triton kernel needs CUDA (the interpreter is for tests)")
    from bert_fast.kernels.mlm_loss import mlm_loss

    return mlm_loss(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["labels"])[0]


def liger(inputs: dict, case: dict):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as err:
        raise Unavailable(f"liger-kernel is not installed ({err})") from None
    if inputs["hidden"].device.type != "cuda":
        raise Unavailable("liger-kernel needs CUDA")
    return liger_fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"],
                                            bias=inputs["bias"], ignore_index=-100)


def flops(case: dict, mode: str) -> float:
    """Logits GEMM 2NVH forward; grad_hidden and grad_weight GEMMs 4NVH backward (the softmax
    work is negligible beside them). Counted where eager spends them, for every provider."""
    gemm = 2 * case["tokens"] * case.get("vocab", VOCAB) * case["hidden"]
    return {"forward": gemm, "backward": 2 * gemm, "full": 3 * gemm}[mode]


def extra_args(parser) -> None:
    parser.add_argument("--compile-report", action="store_true",
                        help="build every kernel for sm_90 (no GPU needed), write "
                             "bench/results/aot/mlm_loss.json (or --out DIR) and print the table")
    parser.add_argument("--passes", action="store_true",
                        help="CUDA: time the stats and gradient passes alone at 4096 x 30522 for a few "
                             "tile shapes (GB/s against the copy ceiling); writes mlm_loss_passes.json")


AOT_JSON = Path(__file__).resolve().parent / "results" / "aot" / "mlm_loss.json"


def compile_report(out_dir: str | None) -> None:
    from bert_fast.kernels.mlm_loss_aot import report

    rows = report()
    path = Path(out_dir) / "mlm_loss.json" if out_dir else AOT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)
    columns = ("kernel", "dtype", "block_r", "block_m", "block_v", "num_warps", "registers", "spills",
               "shared_bytes", "instructions_per_iteration", "skippable", "instructions_per_element", "loops")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |")
    print(f"wrote {path}")


# Tile shapes the --passes sweep tries: (name, module constants). The first is the default.
PASS_CANDIDATES = [
    ("default", {}),
    ("stats 1x4096 w8", dict(STATS_BLOCK_R=1, STATS_BLOCK_V=4096, STATS_WARPS=8)),
    ("stats 2x2048 w8", dict(STATS_BLOCK_R=2, STATS_BLOCK_V=2048, STATS_WARPS=8)),
    ("grad 16x512 w8", dict(GRAD_SUB_M=16, GRAD_BLOCK_V=512, GRAD_WARPS=8)),
    ("grad 8x512 w4", dict(GRAD_SUB_M=8, GRAD_BLOCK_V=512, GRAD_WARPS=4)),
    ("grad 16x256 w8", dict(GRAD_SUB_M=16, GRAD_BLOCK_V=256, GRAD_WARPS=8)),
]


def _time_passes(mlm, hidden, weight, bias, labels, copy_gbs: float) -> dict:
    """Both passes at the module's current tiles on one chunk of real logits."""
    (n, _), v, device = hidden.shape, weight.shape[0], hidden.device
    stats, grad, stride = mlm.stats_config(v), mlm.grad_config(v), mlm.padded_stride(v)
    buf = torch.empty((n, stride), device=device, dtype=hidden.dtype)
    torch.mm(hidden, weight.t(), out=buf[:, :v])
    f32 = dict(device=device, dtype=torch.float32)
    lse, loss, shift = (torch.empty(n, **f32) for _ in range(3))
    correct, target = (torch.empty(n, device=device, dtype=torch.int32) for _ in range(2))
    partial = torch.empty((-(-n // grad["BLOCK_M"]), stride), **f32)

    def run_stats():
        mlm._mlm_stats_kernel[(-(-n // stats["BLOCK_R"]),)](
            buf, bias, labels, lse, loss, correct, shift, target, 0, n, stride, v,
            IGNORE_INDEX=mlm.IGNORE_INDEX, BLOCK_R=stats["BLOCK_R"], BLOCK_V=stats["BLOCK_V"],
            num_warps=stats["num_warps"])

    def run_grad():  # in place: later runs see gradients as logits, the same work
        mlm._mlm_grad_kernel[(stride // grad["BLOCK_V"], -(-n // grad["BLOCK_M"]))](
            buf, bias, shift, target, partial, 0, n, stride, v, BLOCK_M=grad["BLOCK_M"], SUB_M=grad["SUB_M"],
            BLOCK_V=grad["BLOCK_V"], HAS_BIAS_GRAD=True, ACCUMULATE=False, num_warps=grad["num_warps"])

    row = {"stats": stats, "grad": grad}
    for name, fn, moved in (("stats", run_stats, n * v * 2), ("grad", run_grad, 2 * n * v * 2)):
        ms, _, _ = time_ms(fn, device)
        row[f"{name}_ms"], row[f"{name}_gbs"] = ms, moved / (ms * 1e-3) / 1e9
        row[f"{name}_pct_copy"] = 100 * row[f"{name}_gbs"] / copy_gbs
    return row


def passes(args) -> None:
    """The two memory-bound passes alone at 4096 x 30522 bf16, per tile shape: what decides the
    tiles, since the GEMMs around them are cuBLAS's. Bytes: stats reads the logits once, the
    gradient pass reads and writes them."""
    from bert_fast.kernels import mlm_loss as mlm

    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("--passes needs CUDA")
    inputs = make_inputs(dict(tokens=4096, hidden=768), device, torch.bfloat16)
    tensors = [inputs[k].detach() for k in ("hidden", "weight", "bias", "labels")]
    copy = copy_bandwidth_gbs(str(device))
    defaults = {name: getattr(mlm, name) for _, tiles in PASS_CANDIDATES for name in tiles}
    rows = []
    try:
        for label, tiles in PASS_CANDIDATES:
            for name, value in {**defaults, **tiles}.items():
                setattr(mlm, name, value)
            row = {"tiles": label, **_time_passes(mlm, *tensors, copy)}
            rows.append(row)
            said = ", ".join(f"{k} {row[k + '_ms'] * 1e3:.1f} us ({row[k + '_pct_copy']:.0f}% of copy)"
                             for k in ("stats", "grad"))
            print(f"[mlm_loss passes] {label}: {said}", flush=True)
    finally:
        for name, value in defaults.items():
            setattr(mlm, name, value)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mlm_loss_passes.json"
    meta = {**stamp(device, torch.bfloat16), "copy_gbs": copy}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


bench = Benchmark(
    name="mlm_loss",
    make_inputs=make_inputs,
    providers={"eager": eager, "triton": fused, "torch.compile": compiled, "liger": liger},
    gpu_cases=[dict(tokens=n, hidden=h) for h in (768, 1024) for n in (4096, 16384)],
    cpu_cases=[dict(tokens=64, hidden=32, vocab=1000), dict(tokens=256, hidden=64, vocab=VOCAB)],
    modes=("forward", "backward", "full"),
    flops=flops,
    cpu_providers=("eager",),
    baseline="eager",
    extra_args=extra_args,
    description=__doc__.splitlines()[0],
)

if __name__ == "__main__":
    args = bench.parser().parse_args()
    bench.args = args
    if args.compile_report:
        compile_report(args.out)
    elif args.passes:
        passes(args)
    else:
        bench.run(args)
