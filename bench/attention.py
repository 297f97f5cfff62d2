"""Attention at BERT shapes: the unpadded FlashAttention-2 Triton kernel (kernels/attention.py)
against eager PyTorch (matmul-softmax-matmul), `scaled_dot_product_attention` and flash-attn.

    python bench/attention.py                    # GPU: batch 32..256, seq 128/512, 12/16 heads, bf16
    python bench/attention.py --device cpu       # tiny sizes, the torch reference only
    python bench/attention.py --compile-report   # sm_90 builds: writes bench/results/aot/attention.json
    python bench/attention.py --host-overhead    # CPU: Python microseconds per call, kernels stubbed

Every case runs without padding and with 30% padding (`pad` column; lengths drawn uniformly in
[0.4 S, S], seeded). Providers:
- `eager`: padded [B, heads, S, D] matmul, additive mask, softmax, matmul (the baseline).
- `sdpa`: `F.scaled_dot_product_attention` with the padding mask (PyTorch picks its
  memory-efficient kernel, as flash does not take masks).
- `sdpa_flash`: SDPA forced onto its flash backend, which takes no mask: it attends over the
  padding too, i.e. what a dense kernel costs when nobody unpads (exact only at pad 0).
- `flash_attn`: `flash_attn_varlen_func` on the packed tokens, when flash-attn is installed.
- `torch_flash`: PyTorch's own varlen FlashAttention-2 (`aten._flash_attention_forward` with
  cu_seqlens: SDPA flash's kernel without the padding), as `model.attention_impl: torch_flash`
  runs it (bert_fast/ops/torch_flash.py).
- `triton`: ours on the packed tokens (the encoder unpads once per batch, not per layer, so the
  packing is prepared outside the timed region, as for flash_attn), on the fused QKV layout the
  encoder has: one [T, 3, heads, head_dim] tensor, whose gradient comes back as one buffer.
- `triton_padded`: ours through the padded convenience form (unpad, attend, re-pad per call).

TFLOP/s counts real tokens only: the forward is two GEMMs per sequence, 4 * len^2 * heads * D
FLOPs; the backward is five, 2.5x the forward (flash-attn's benchmark convention), so forward +
backward is 3.5x. Dropout is 0.1 in every provider (BERT's attention dropout) unless
`--dropout 0` says otherwise. Targets on H100 bf16 (issue 6): forward + backward at seq 512 at
least 1.0x SDPA flash and 3x eager, padding costs no time, at least 220 TFLOP/s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import Benchmark, Unavailable, write_aot_report

HEAD_DIM = 64


def lengths_of(case: dict) -> list[int]:
    seq, batch = case["seq"], case["batch"]
    if case["pad"] == 0:
        return [seq] * batch
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    return (seq - (torch.rand(batch, generator=g) * 2 * case["pad"] * seq).long()).clamp(min=1).tolist()


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from bert_fast.ops.padding import unpad

    batch, seq, heads = case["batch"], case["seq"], case["heads"]
    lengths = torch.tensor(lengths_of(case), device=device)
    mask = torch.arange(seq, device=device)[None, :] < lengths[:, None]
    padded = [torch.randn(batch, seq, heads, HEAD_DIM, device=device, dtype=dtype) for _ in range(3)]
    packing = unpad(mask)
    packed = [packing.pack(t).detach().requires_grad_() for t in padded]
    qkv = torch.stack([packing.pack(t) for t in padded], dim=1).detach().requires_grad_()
    inputs = {"mask": mask, "packing": packing, "qkv": qkv}
    inputs.update({n: t.requires_grad_() for n, t in zip(("q", "k", "v"), padded)})
    inputs.update({f"{n}_packed": t for n, t in zip(("q", "k", "v"), packed)})
    return inputs


def _dropout() -> float:
    return bench.args.dropout if bench.args is not None else 0.1


def eager(inputs: dict, case: dict):
    q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))  # [B, heads, S, D]
    scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5
    scores = scores.masked_fill(~inputs["mask"][:, None, None, :], torch.finfo(q.dtype).min)
    probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), _dropout(), training=True)
    return (probs @ v).transpose(1, 2)


def sdpa(inputs: dict, case: dict):
    q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))
    mask = inputs["mask"][:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=_dropout()).transpose(1, 2)


def sdpa_flash(inputs: dict, case: dict):
    if inputs["q"].device.type != "cuda":
        raise Unavailable("SDPA's flash backend needs CUDA")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=_dropout()).transpose(1, 2)


def flash_attn(inputs: dict, case: dict):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise Unavailable(f"flash-attn is not installed ({err})") from None
    p = inputs["packing"]
    return flash_attn_varlen_func(inputs["q_packed"], inputs["k_packed"], inputs["v_packed"],
                                  p.cu_seqlens, p.cu_seqlens, p.max_seqlen, p.max_seqlen,
                                  dropout_p=_dropout())


def torch_flash(inputs: dict, case: dict):
    from bert_fast.ops import torch_flash as flash

    q = inputs["q_packed"]
    reason = flash.unavailable_reason(q.device, q.dtype, q.shape[-1])
    if reason is not None:
        raise Unavailable(f"torch's varlen flash attention cannot run: {reason}")
    p = inputs["packing"]
    return flash.attention_varlen(q, inputs["k_packed"], inputs["v_packed"], p.cu_seqlens, p.max_seqlen,
                                  _dropout())


def triton_varlen(inputs: dict, case: dict):
    if inputs["q"].device.type != "cuda":
        raise Unavailable("the Triton kernel needs CUDA (the interpreter is for tests)")
    from bert_fast.kernels.attention import attention_varlen_qkvpacked

    p = inputs["packing"]
    return attention_varlen_qkvpacked(inputs["qkv"], p.cu_seqlens, p.max_seqlen, dropout_p=_dropout(),
                                      check=False)


def triton_padded(inputs: dict, case: dict):
    if inputs["q"].device.type != "cuda":
        raise Unavailable("the Triton kernel needs CUDA (the interpreter is for tests)")
    from bert_fast import ops

    dropout_p = _dropout()  # ops.attention: unpad, the varlen kernel, re-pad
    return ops.attention(inputs["q"], inputs["k"], inputs["v"], inputs["mask"], dropout_p=dropout_p,
                         training=dropout_p > 0, backend="fast")


def flops(case: dict, mode: str) -> float:
    """Real tokens only: 4 * len^2 * heads * D per sequence forward; backward 2.5x that."""
    forward = 4 * sum(n * n for n in lengths_of(case)) * case["heads"] * HEAD_DIM
    return {"forward": 1.0, "backward": 2.5, "full": 3.5}[mode] * forward


def extra_args(parser) -> None:
    parser.add_argument("--dropout", type=float, default=0.1, help="attention dropout (default 0.1)")
    parser.add_argument("--host-overhead", action="store_true",
                        help="CPU: microseconds of Python per eager call, with the kernels stubbed out")


def host_overhead() -> None:
    """Per-call Python time of the eager path (validation, allocation, autograd, launch
    arguments) with every kernel launch replaced by a no-op: what a call costs the CPU before the
    GPU does anything. Runs anywhere; on the CPU the kernels could not run anyway."""
    import time

    from bert_fast.kernels import attention as attn

    launched = []
    real_launch = attn._launch
    attn._launch = lambda kernel, grid, traced: (lambda *a, **k: launched.append(kernel))
    try:
        total, heads = 2 * 128, 12  # small: the tensors' own CPU cost must not count
        qkv = torch.randn(total, 3, heads, HEAD_DIM, requires_grad=True)
        cu = torch.arange(0, total + 1, 128, dtype=torch.int32)
        seed = torch.zeros(1, dtype=torch.int64)
        grad = torch.randn(total, heads, HEAD_DIM)

        def call():
            qkv.grad = None
            out = attn.attention_varlen_unchecked(*qkv.unbind(1), cu, 128, dropout_p=0.1, seed=seed,
                                                  site=3, qkv=qkv)[0]
            out.backward(grad)

        for _ in range(20):
            call()
        launched.clear()
        runs = []
        for _ in range(200):
            t0 = time.perf_counter()
            call()
            runs.append(time.perf_counter() - t0)
        runs.sort()
        print(f"eager attention_varlen_unchecked (qkv packed, dropout, forward + backward): "
              f"{runs[len(runs) // 2] * 1e6:.1f} us per call (median of 200), "
              f"{len(launched) / 200:.0f} kernel launches per call")
    finally:
        attn._launch = real_launch


def aot_report() -> list[dict]:
    """The sm_90 builds of this op's kernels (kernels/attention_aot.py)."""
    from bert_fast.kernels.attention_aot import report

    return report("bf16")


bench = Benchmark(
    name="attention",
    description=__doc__.split("\n\n")[0],
    make_inputs=make_inputs,
    providers={"eager": eager, "sdpa": sdpa, "sdpa_flash": sdpa_flash, "flash_attn": flash_attn,
               "torch_flash": torch_flash, "triton": triton_varlen, "triton_padded": triton_padded},
    gpu_cases=[dict(batch=b, seq=s, heads=h, pad=pad)
               for b, s, h in ((256, 128, 12), (128, 128, 16), (32, 512, 12), (64, 512, 16))
               for pad in (0.0, 0.3)],
    cpu_cases=[dict(batch=4, seq=64, heads=2, pad=0.0), dict(batch=4, seq=64, heads=2, pad=0.3)],
    flops=flops,
    cpu_providers=("eager", "sdpa"),
    baseline="eager",
    extra_args=extra_args,
    aot_report=aot_report,
)

if __name__ == "__main__":
    args = bench.parser().parse_args()
    bench.args = args
    if args.compile_report:
        write_aot_report("attention", bench.aot_report(), args.out)
    elif args.host_overhead:
        host_overhead()
    else:
        bench.run(args)
