"""One function per fused op; the single place that picks an implementation.

Backends (`BertConfig.backend`): `torch` is eager PyTorch, always available and the test oracle;
`fast` is our kernels (Triton in kernels/, C++/CUDA in csrc/); `auto` means `fast` on CUDA tensors
and `torch` elsewhere. An op whose fast kernel has not landed yet runs its torch form under any
backend, so the model code never branches on the device or on what is implemented.

The package also holds what the switch dispatches to outside kernels/: the C++/CUDA extension's
loader (extension.py) and op wrapper (bias_gelu_ext.py), PyTorch's varlen FlashAttention-2
(torch_flash.py), unpadding (padding.py), the FP8 GEMM (fp8.py) and the FP8 FFN's fused GELU
(fp8_ffn.py). Validation happens once per
call: the op checks its arguments on the torch path, the kernel's public function on the fast path.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from bert_fast.backends import ATTENTION_IMPLS, BACKENDS
from bert_fast.kernels.checks import FLOAT_DTYPES, INT_DTYPES, check_same, check_tensor
from bert_fast.labels import IGNORE_INDEX
from bert_fast.ops import extension, padding
from bert_fast.ops.bias_gelu_ext import APPROXIMATIONS, bias_gelu_reference, bias_gelu_unchecked, check_args


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> `fast` on CUDA, `torch` elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "fast" if device.type == "cuda" else "torch"
    return backend


def _use_extension(backend: str, device: torch.device, op: str) -> bool:
    """Whether `op` should run the C++/CUDA extension. Where it has no kernels for `device`, both
    `auto` and `fast` run torch, with one warning per process (`extension.use_fallback`;
    BERT_FAST_CUDA=1 makes that an error)."""
    chosen = resolve_backend(backend, device)
    if chosen == "torch":
        return False
    if torch.compiler.is_compiling():  # decided when the step ran eagerly
        return not extension.fallback_chosen(device)
    return not extension.use_fallback(device)


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA, and on the CPU only through the interpreter (tests)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _use_triton(backend: str, device: torch.device, op: str) -> bool:
    """Whether `op` should run its Triton kernel from kernels/. `auto` means CUDA only (the
    interpreter is for tests, far slower than torch); explicit `fast` where Triton cannot run is
    an error naming the way out."""
    chosen = resolve_backend(backend, device)
    if chosen == "torch":
        return False
    if not triton_runs_on(device):
        raise RuntimeError(
            f"bert_fast.ops.{op}: backend='fast' needs a CUDA device for its Triton kernel, got "
            f"{device} (set TRITON_INTERPRET=1 to run it on the CPU for testing, or use "
            "backend='auto' or 'torch')")
    return True


def _kernel_runs(backend: str, x, op: str) -> bool:
    """Whether `op` runs its Triton kernel for input `x`: the one place that keeps float64 (a test
    oracle; the kernels compute in float32) and non-tensors on the torch path, whose checks then
    name the argument. Each op validates its arguments once: the kernel's public function on the
    fast path, the op itself on the torch path."""
    return (isinstance(x, torch.Tensor) and x.dtype != torch.float64
            and _use_triton(backend, x.device, op))


def linear(x, weight: torch.Tensor, bias: torch.Tensor | None = None, *, fp8=None,
           record: bool = True) -> torch.Tensor:
    """`x @ weight.T (+ bias)`: every encoder GEMM. x [..., K], weight [N, K], bias [N] or None
    (left out where a fused epilogue adds it). `fp8`: None runs `F.linear`; an
    `bert_fast.ops.fp8.Fp8State` runs the GEMM in FP8 with its scaling (bert_fast/ops/fp8.py; the
    bias is then added to the GEMM's float32 result, in its epilogue on CUDA), recording this
    step's amaxes when `record` (training). x may then be the `Fp8Activation` `linear_gelu`
    returned, already cast under this state."""
    if fp8 is None:
        return F.linear(x, weight, bias)
    from bert_fast.ops import fp8 as _fp8
    from bert_fast.ops.fp8_ffn import Fp8Activation

    given = None
    if isinstance(x, Fp8Activation):
        x, given = x
    _check_fp8_linear(x, weight, bias, fp8)
    return _fp8.fp8_linear(x, weight, fp8, record=record, given=given, bias=bias)


def _check_fp8_linear(x, weight, bias, state) -> None:
    from bert_fast.ops import fp8 as _fp8

    check_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    check_tensor("weight", weight, ndim=2, shape=(None, x.shape[-1]), device=x.device,
                 dtypes=(torch.float32, torch.float16, torch.bfloat16))
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), device=x.device)
    if not isinstance(state, _fp8.Fp8State):
        raise TypeError(f"fp8 must be a bert_fast.ops.fp8.Fp8State or None, got {type(state).__name__}")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str = "none", *,
                fp8=None, fp8_next=None, record: bool = True, backend: str = "auto"):
    """`gelu(x @ weight.T + bias)`: the FFN's first GEMM and its activation. Without FP8 `linear`
    then `bias_gelu`. With `fp8` (this GEMM's Fp8State) and `fp8_next` (the second FFN GEMM's)
    the activation comes back already cast for that GEMM (an `Fp8Activation`, for `linear` with
    fp8=fp8_next): bias + GELU run inside the FP8 casts (bert_fast/ops/fp8_ffn.py), unless
    `fp8_ffn.FUSE_GELU` is off."""
    from bert_fast.ops import fp8_ffn

    if fp8 is None or fp8_next is None or not fp8_ffn.FUSE_GELU:
        return bias_gelu(linear(x, weight, fp8=fp8, record=record), bias, approximate, backend=backend)
    _check_fp8_linear(x, weight, bias, fp8)
    if not isinstance(fp8_next, type(fp8)):
        raise TypeError(f"fp8_next must be a bert_fast.ops.fp8.Fp8State, got {type(fp8_next).__name__}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return fp8_ffn.fp8_linear_gelu(x, weight, bias, fp8, fp8_next, approximate=approximate, record=record)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none",
              backend: str = "auto") -> torch.Tensor:
    """`gelu(x + bias)`: the FFN activation after its bias-free first GEMM."""
    check_args(x, bias, approximate)
    if _use_extension(backend, x.device, "bias_gelu"):
        return bias_gelu_unchecked(x, bias, approximate)
    return bias_gelu_reference(x, bias, approximate)


def add_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                   x_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   dropout_p: float = 0.0, training: bool = False, seed: torch.Tensor | None = None,
                   site: int = 0, backend: str = "auto") -> torch.Tensor:
    """`LayerNorm(residual + dropout(x + x_bias))` over the last dimension: every post-LN
    sub-layer's ending (x_bias is the preceding GEMM's bias, left out of the GEMM to fuse here).
    On the fast backend `seed` (the forward's [1] int64 key) and `site` (this call's own) fix the
    dropout mask; the kernel validates its arguments (kernels/layernorm.py)."""
    p = dropout_p if training else 0.0
    if _kernel_runs(backend, x, "add_layer_norm"):
        from bert_fast.kernels.layernorm import add_layer_norm as add_layer_norm_triton
        return add_layer_norm_triton(x, weight, bias, eps, x_bias=x_bias, residual=residual, dropout_p=p,
                                     seed=seed, site=site)
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    hidden = (x.shape[-1],)
    for name, value in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        if value is not None:
            check_tensor(name, value, shape=hidden, device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), device=x.device)
    h = x if x_bias is None else x + x_bias
    h = F.dropout(h, p, training)
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def embeddings(input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
               word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor,
               norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, *,
               padding_idx: int | None = None, dropout_p: float = 0.0, training: bool = False,
               seed: torch.Tensor | None = None, site: int = 0, check_ids: bool = True,
               backend: str = "auto") -> torch.Tensor:
    """`dropout(LayerNorm(word[ids] + token_type[types] + position[pos]))` for ids of any shape.

    `padding_idx` keeps the pad row's word-embedding gradient at zero, as Hugging Face does.
    `check_ids` checks id ranges on the fast backend (one host sync); the model skips it for a
    batch it validated on the host. `seed` and `site` fix the fast backend's dropout mask."""
    p = dropout_p if training else 0.0
    if _kernel_runs(backend, word, "embeddings"):  # the kernel validates its arguments
        from bert_fast.kernels.embeddings import embeddings as embeddings_triton
        return embeddings_triton(input_ids, token_type_ids, position_ids, word, position, token_type,
                                 norm_weight, norm_bias, eps, padding_idx=padding_idx, dropout_p=p, seed=seed,
                                 site=site, check_ids=check_ids)
    check_tensor("word", word, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("input_ids", input_ids, dtypes=INT_DTYPES)
    for name, value in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        check_tensor(name, value, dtypes=INT_DTYPES, shape=tuple(input_ids.shape))
    for name, value in (("position", position), ("token_type", token_type)):
        check_tensor(name, value, ndim=2, shape=(None, word.shape[-1]), device=input_ids.device)
    h = F.embedding(input_ids, word, padding_idx) + F.embedding(token_type_ids, token_type)
    h = h + F.embedding(position_ids, position)
    h = F.layer_norm(h, (h.shape[-1],), norm_weight, norm_bias, eps)
    return F.dropout(h, p, training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor, *,
              dropout_p: float = 0.0, training: bool = False, backend: str = "auto") -> torch.Tensor:
    """Bidirectional multi-head attention. q, k, v: [B, S, heads, head_dim]; attention_mask:
    [B, S], nonzero = a real token (keys that are padding get no weight). Returns [B, S, heads,
    head_dim]. Padding queries still get an output (ignored by the losses)."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    for name, value in (("k", k), ("v", v)):
        check_tensor(name, value, shape=tuple(q.shape))
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    check_tensor("attention_mask", attention_mask, shape=tuple(q.shape[:2]), device=q.device)
    if _attention_kernel_runs(backend, q.dtype, q.shape[-1], q.device):
        from bert_fast.kernels.attention import attention_varlen_unchecked

        # Unpads (one host sync), runs the varlen kernel on the packed (contiguous) copies,
        # re-pads; padding queries get zeros.
        packing = padding.unpad(attention_mask)
        out, _ = attention_varlen_unchecked(packing.pack(q), packing.pack(k), packing.pack(v),
                                            packing.cu_seqlens, packing.max_seqlen,
                                            dropout_p=dropout_p if training else 0.0)
        return packing.pad(out)
    # Additive mask with the dtype's most negative value, as Hugging Face builds it: a row of
    # only padding then attends uniformly instead of producing NaN.
    keep = attention_mask[:, None, None, :].to(torch.bool)
    mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
    mask = mask.masked_fill(~keep, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        dropout_p=dropout_p if training else 0.0)
    return out.transpose(1, 2)


def _attention_kernel_runs(backend: str, dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """The Triton kernel covers head_dim 16/32/64/128 in fp32/fp16/bf16; anything else runs torch."""
    return (dtype != torch.float64 and head_dim in (16, 32, 64, 128)  # float64: see _kernel_runs
            and _use_triton(backend, device, "attention"))


@functools.cache
def attention_impl(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The fast backend's attention: "triton" (kernels/attention.py) or "torch_flash" (PyTorch's
    varlen FlashAttention-2, bert_fast/ops/torch_flash.py). "auto" takes torch_flash where it runs:
    the only committed GPU table (bench/results/nvidia-h200/attention.md) has it ahead, 2-3x at
    dropout 0.1; the Triton kernel becomes the default where a table shows it faster."""
    from bert_fast.ops import torch_flash

    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    reason = torch_flash.unavailable_reason(device, dtype, head_dim)
    if impl == "torch_flash" and reason is not None:
        raise RuntimeError(f"bert_fast.ops.attention: attention_impl='torch_flash' cannot run: {reason}; "
                           "use attention_impl='triton' or 'auto'")
    if impl == "auto":
        return "triton" if reason is not None else "torch_flash"
    return impl


def new_dropout_seed(device: torch.device) -> torch.Tensor:
    """The [1] int64 key the fast attention draws its dropout masks from: one per forward pass
    (from torch's generator, no host sync), shared by every layer, which each add their own site."""
    from bert_fast.kernels.dropout import new_seed

    return new_seed(device)


def varlen_attention_runs(head_dim: int, dtype: torch.dtype, device: torch.device,
                          backend: str = "auto") -> bool:
    """Whether attention runs the varlen kernel, so the encoder works on packed [T, hidden] rows."""
    return _attention_kernel_runs(backend, dtype, head_dim, device)


def attention_packing(attention_mask: torch.Tensor | None, shape: tuple[int, int], head_dim: int,
                      dtype: torch.dtype, device: torch.device, backend: str = "auto"):
    """A `bert_fast.ops.padding.Packing` of the batch when attention runs the varlen kernel (the
    encoder then works on packed [T, hidden] rows), else None (it stays padded). One host sync
    when a mask is given (T and max_seqlen), none without one."""
    if not _attention_kernel_runs(backend, dtype, head_dim, device):
        return None
    if attention_mask is None:
        return padding.dense(*shape, device)
    return padding.unpad(attention_mask)


def _check_varlen(q, cu_seqlens, max_seqlen, seed, site) -> None:
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if seed is not None:
        check_tensor("seed", seed, shape=(1,), dtypes=(torch.int64,), device=q.device)
    if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < 2**32:
        raise ValueError(f"site must be an int in [0, 2**32), got {site!r}")


def _varlen_torch(q, k, v, cu_seqlens, dropout_p):
    """The torch form: SDPA one sequence at a time (the reference; one host sync)."""
    bounds = cu_seqlens.tolist()
    outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), dropout_p=dropout_p)
            .transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs) if outs else torch.empty_like(q)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, dropout_p: float = 0.0, training: bool = False,
                     check: bool = True, seed: torch.Tensor | None = None, site: int = 0,
                     impl: str = "auto", backend: str = "auto") -> torch.Tensor:
    """Attention within each packed sequence: q, k, v [T, heads, head_dim] (rows may be strided
    views of one QKV output), cu_seqlens [B + 1] int32, max_seqlen >= the longest sequence.
    Returns [T, heads, head_dim]. `check` validates cu_seqlens' values (a host sync; the encoder
    skips it for the cu_seqlens `bert_fast.ops.padding.unpad` built). `seed` and `site` key the Triton
    kernel's dropout masks (a fresh seed per call when None); `impl` picks the fast backend's
    kernel (`attention_impl`). The torch form loops over the sequences."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    for name, value in (("k", k), ("v", v)):
        check_tensor(name, value, shape=tuple(q.shape))
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    _check_varlen(q, cu_seqlens, max_seqlen, seed, site)
    p = dropout_p if training else 0.0
    if not _attention_kernel_runs(backend, q.dtype, q.shape[-1], q.device):
        return _varlen_torch(q, k, v, cu_seqlens, p)
    from bert_fast.kernels import attention as kernel

    for name, value in (("q", q), ("k", k), ("v", v)):
        if value.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), "
                             f"got strides {value.stride()}")
    if check:
        kernel.check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if attention_impl(impl, q.device, q.dtype, q.shape[-1]) == "torch_flash":
        from bert_fast.ops import torch_flash

        return torch_flash.attention_varlen(q, k, v, cu_seqlens, max_seqlen, p)
    return kernel.attention_varlen_unchecked(q, k, v, cu_seqlens, max_seqlen, dropout_p=p, seed=seed,
                                             site=site)[0]


def attention_qkv(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
                  dropout_p: float = 0.0, training: bool = False, seed: torch.Tensor | None = None,
                  site: int = 0, impl: str = "auto", backend: str = "auto") -> torch.Tensor:
    """`attention_varlen` on the fused QKV GEMM's output viewed as [T, 3, heads, head_dim], with
    cu_seqlens from `bert_fast.ops.padding.unpad` (not re-checked): the encoder's call. On the Triton
    kernel the gradient comes back as one [T, 3, heads, head_dim] buffer (no stack of dq, dk, dv)."""
    check_tensor("qkv", qkv, ndim=4, dtypes=FLOAT_DTYPES, shape=(None, 3, None, None))
    _check_varlen(qkv, cu_seqlens, max_seqlen, seed, site)
    q, k, v = qkv.unbind(1)
    p = dropout_p if training else 0.0
    if not _attention_kernel_runs(backend, qkv.dtype, qkv.shape[-1], qkv.device):
        return _varlen_torch(q, k, v, cu_seqlens, p)
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be contiguous in head_dim (stride(-1) == 1), got strides {qkv.stride()}")
    if attention_impl(impl, qkv.device, qkv.dtype, qkv.shape[-1]) == "torch_flash":
        from bert_fast.ops import torch_flash

        return torch_flash.attention_varlen(q, k, v, cu_seqlens, max_seqlen, p)
    from bert_fast.kernels.attention import attention_varlen_unchecked

    return attention_varlen_unchecked(q, k, v, cu_seqlens, max_seqlen, dropout_p=p, seed=seed, site=site,
                                      qkv=qkv)[0]


def mlm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
             *, check_labels: bool = True, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM decoder + softmax cross-entropy on the predicted positions only.

    hidden [N, H], weight [V, H] (the tied word embeddings), bias [V], labels [N] (-100 ignored).
    Returns (mean loss over non-ignored rows, number of correct argmax predictions); the loss is
    0, not NaN, when nothing is predicted. The fast backend runs kernels/mlm_loss.py, which never
    holds the [N, V] logits; `check_labels=False` skips its label check (a host read on the CPU)
    for labels checked where the batch was built."""
    if _kernel_runs(backend, hidden, "mlm_loss"):
        from bert_fast.kernels import mlm_loss as fused  # lazily: triton only where it runs

        loss, correct, _ = fused.mlm_loss(hidden, weight, bias, labels,  # validates its arguments
                                          check_labels=check_labels)
        return loss, correct
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, shape=(None, hidden.shape[1]), device=hidden.device)
    check_tensor("bias", bias, shape=(weight.shape[0],), device=hidden.device)
    check_tensor("labels", labels, dtypes=INT_DTYPES, shape=(hidden.shape[0],), device=hidden.device)
    logits = F.linear(hidden, weight, bias).float()
    valid = labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = valid.sum()
    loss = loss_sum / count.clamp(min=1)
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss, correct
