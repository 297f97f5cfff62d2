"""LayerNorm at BERT shapes: the fused residual + bias + dropout + LayerNorm kernel
(kernels/layernorm.py) against eager PyTorch, torch.compile, apex FusedLayerNorm and Liger-Kernel's
layer norm.

    python bench/layernorm.py                  # GPU: tokens 16k..256k, hidden 768/1024, bf16
    python bench/layernorm.py --device cpu     # tiny sizes, the torch reference only

Two ops per shape (the `op` column): `add_ln` is BERT's sub-layer ending,
`LayerNorm(residual + dropout(x + bias))` with p = 0.1 in training mode; `ln` is a plain LayerNorm
(the MLM head's). apex and Liger fuse only the LayerNorm, so under `add_ln` the bias, dropout and
residual run as eager PyTorch before their kernel, which is how a model would use them.

GB/s counts the bytes the fused kernel moves, the same figure for every provider (so it ranks them
like time does). `add_ln`: forward reads x and residual, writes y and x-hat (the backward's input);
backward reads dy and x-hat, writes dx and dresidual: 4 + 4 tensors, as many as recomputing h in
the backward (3 + 5) would move. `ln`: forward reads x, writes y; backward reads dy and x, writes
dx. Parameters and the float32 mean/rstd are under 0.1% of that and left out.

Targets (issue 20): add_ln forward >= 85% and backward >= 75% of the measured copy bandwidth at 64k+
tokens, and >= 1.0x eager at 16k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import DTYPES, Benchmark, Unavailable
from harness import compiled as harness_compiled

EPS = 1e-12
DROPOUT = 0.1


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    t, h = case["tokens"], case["hidden"]

    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()

    inputs = {"x": leaf(t, h), "weight": leaf(h, scale=0.1, shift=1.0), "bias": leaf(h, scale=0.1)}
    if case["op"] == "add_ln":
        inputs.update(residual=leaf(t, h), x_bias=leaf(h, scale=0.1))
    return inputs


def _pre_norm(inputs: dict) -> torch.Tensor:
    """What add_ln feeds the LayerNorm, in eager PyTorch (plain x for `ln`)."""
    if "residual" not in inputs:
        return inputs["x"]
    return inputs["residual"] + F.dropout(inputs["x"] + inputs["x_bias"], DROPOUT, training=True)


def eager_fn(x, weight, bias, residual=None, x_bias=None):
    h = x if residual is None else residual + F.dropout(x + x_bias, DROPOUT, training=True)
    return F.layer_norm(h, (h.shape[-1],), weight, bias, EPS)


def eager(inputs: dict, case: dict):
    return eager_fn(**inputs)


compiled = harness_compiled(eager_fn)


def apex(inputs: dict, case: dict):
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except ImportError as err:
        raise Unavailable(f"apex (with its CUDA extensions) is not installed ({err})") from None
    h = _pre_norm(inputs)
    return fused_layer_norm_affine(h, inputs["weight"], inputs["bias"], (h.shape[-1],), EPS)


def liger(inputs: dict, case: dict):
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError as err:
        raise Unavailable(f"liger-kernel is not installed ({err})") from None
    if inputs["x"].device.type != "cuda":
        raise Unavailable("liger-kernel needs CUDA")
    return LigerLayerNormFunction.apply(_pre_norm(inputs), inputs["weight"], inputs["bias"], EPS)


def fused(inputs: dict, case: dict):
    if inputs["x"].device.type != "cuda":
        raise Unavailable("the Triton kernel needs CUDA (the interpreter is for tests)")
    from bert_fast.kernels.layernorm import add_layer_norm

    return add_layer_norm(inputs["x"], inputs["weight"], inputs["bias"], EPS,
                          residual=inputs.get("residual"), x_bias=inputs.get("x_bias"),
                          dropout_p=DROPOUT if case["op"] == "add_ln" else 0.0)


def _element_size() -> int:
    args = bench.args
    name = args.dtype if args and args.dtype else ("bf16" if args and args.device.startswith("cuda")
                                                   else "fp32")
    return torch.empty((), dtype=DTYPES[name]).element_size()


def bytes_moved(case: dict, mode: str) -> float:
    """Minimum traffic of the fused kernel, in units of one [tokens, hidden] tensor (see the
    module docstring)."""
    add = case["op"] == "add_ln"
    forward = 4 if add else 2  # x (+ residual) in, y (+ x-hat) out
    backward = 4 if add else 3  # dy, x-hat (or x) in; dx (+ dresidual) out
    tensors = {"forward": forward, "backward": backward, "full": forward + backward}[mode]
    return tensors * case["tokens"] * case["hidden"] * _element_size()


def aot_report() -> list[dict]:
    """The sm_90 builds of this op's kernels (kernels/row_norm_aot.py)."""
    from bert_fast.kernels.row_norm_aot import layernorm_report

    return layernorm_report("bf16")


bench = Benchmark(
    name="layernorm",
    make_inputs=make_inputs,
    providers={"eager": eager, "triton": fused, "torch.compile": compiled, "apex": apex, "liger": liger},
    gpu_cases=[dict(op=op, tokens=t, hidden=h) for op in ("add_ln", "ln") for h in (768, 1024)
               for t in (16384, 65536, 262144)],
    cpu_cases=[dict(op="add_ln", tokens=256, hidden=128), dict(op="ln", tokens=256, hidden=128)],
    modes=("forward", "backward", "full"),
    bytes=bytes_moved,
    cpu_providers=("eager",),
    baseline="eager",
    description=__doc__.splitlines()[0],
    aot_report=aot_report,
)

if __name__ == "__main__":
    bench.main()
