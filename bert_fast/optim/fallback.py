"""Fallbacks of the fused optimizer ops (csrc/optim*), for a device the extension has no kernels
for: a CUDA machine whose `bert_fast._C` was built without a CUDA toolkit
(bert_fast.ops.extension.use_fallback). Plain functions over lists of tensors.

LAMB on CUDA (`triton_lamb`): the Triton kernels of bert_fast.kernels.lamb, the CUDA kernels'
contract and passes (40 bytes per float32 parameter, as csrc/optim_kernels.cu; Triton needs no
CUDA toolkit). On any other device, or without Triton, the functions below:

LAMB: the same float32 math as `lamb_phase1` / `lamb_phase2` (csrc/optim_math.h), in the same order
of operations, as multi-tensor `torch._foreach_*` ops (one launch per op for all tensors on CUDA;
about 130 bytes per parameter, so on a GPU 2.5-3x the fused step, which is why CUDA takes Triton).
They work on the same segments (rows of tensor, start, length, slot: whole tensors, or under ZeRO
the pieces of original tensors inside a flat partition), so the per-slot sums of squares, and with
them the trust ratios after FusedLAMB's all-reduce, are exact under ZeRO as the kernels' are;
elements outside every segment (ZeRO-3 padding) are never read or written. Unlike the kernels,
phase 1 keeps the update direction it computed for phase 2 (one more float32 buffer per
parameter, one recomputation fewer), and the per-slot step sizes reach the elements through one
per-element buffer (`repeat_interleave` on the device: no host sync, one multi-tensor addcmul).

AdamW: torch's fused AdamW (`torch._fused_adamw_`, CPU and CUDA), the math of `adamw_step`. Its
grad_scale would divide the grads in place, so clipping multiplies copies by 1 / clip instead, as
the kernel does.

Results agree with the kernels to float32 rounding, not bit for bit: the kernels' compiler may
contract a * b + c into one rounding, and sums of squares reduce in another order.
"""

from __future__ import annotations

import functools

import torch

# Per segments tensor (held, so its id stays unique) and device: its rows as Python tuples, whether
# they are whole tensors in order, and the slot and length of each row on the device.
_segment_cache: dict[tuple[int, torch.device], tuple] = {}


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_lamb(device: torch.device) -> bool:
    """Whether LAMB's fallback on `device` runs the Triton kernels (bert_fast.kernels.lamb): on
    CUDA devices where Triton imports; the foreach functions below elsewhere."""
    return device.type == "cuda" and _triton_importable()


def _segments(segments: torch.Tensor, tensors: list[torch.Tensor]):
    device = tensors[0].device
    key = (id(segments), device)
    hit = _segment_cache.get(key)
    if hit is None or hit[0] is not segments:
        rows = [tuple(r) for r in segments.tolist()]
        whole = rows == [(i, 0, t.numel(), i) for i, t in enumerate(tensors)]
        slots = torch.tensor([r[3] for r in rows], dtype=torch.int64, device=device)
        lengths = torch.tensor([r[2] for r in rows], dtype=torch.int64, device=device)
        hit = (segments, rows, whole, slots, lengths)
        _segment_cache[key] = hit
    return hit[1:]


def _views(tensors: list[torch.Tensor], rows, whole: bool) -> list[torch.Tensor]:
    """One tensor per segment: the tensors themselves, or flat pieces of them."""
    if whole:
        return list(tensors)
    return [tensors[t].view(-1).narrow(0, start, length) for t, start, length, _ in rows]


def _sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sums of squares of each tensor, float32 [n] (accumulated in float32, also for bf16/fp16)."""
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).square()


def optim_sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.ops.bert_fast.optim_sumsq`: per-tensor sums of squares, float32 [n]."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return _sumsq(list(tensors))


def lamb_phase1(params, grads, exp_avg, exp_avg_sq, segments, num_slots, clip, beta1, beta2, eps,
                weight_decay, bias_correction1, bias_correction2, adam_w_mode):
    """`lamb_phase1`: moments from the clipped grads, in place, over the segments; returns the
    per-slot sums of squares of (w, update), float32 [num_slots, 2], and the update direction of
    each segment for `lamb_phase2`."""
    device = params[0].device
    norms = torch.zeros(num_slots, 2, dtype=torch.float32, device=device)
    rows, whole, slots, _ = _segments(segments, params)
    if not rows:
        return norms, []
    w, m, v = (_views(t, rows, whole) for t in (params, exp_avg, exp_avg_sq))
    g = _views(grads, rows, whole)
    inv_clip = clip.reshape(()).reciprocal()  # g * (1 / clip), as the kernel
    if g[0].dtype == torch.float32:
        g = torch._foreach_mul(g, inv_clip)
    else:
        g = [t.float() for t in g]
        torch._foreach_mul_(g, inv_clip)
    if not adam_w_mode:  # L2: g + wd * w before the moments
        torch._foreach_add_(g, w, alpha=weight_decay)
    # m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, g, alpha=1.0 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
    del g
    # update = (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * w when decoupled)
    denom = torch._foreach_mul(v, 1.0 / bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_mul(m, 1.0 / bias_correction1)
    torch._foreach_div_(update, denom)
    del denom
    if adam_w_mode:
        torch._foreach_add_(update, w, alpha=weight_decay)
    sums = torch.stack([_sumsq(w), _sumsq(update)], dim=1)
    if whole and num_slots == len(rows):
        norms.copy_(sums)
    else:
        norms.index_add_(0, slots, sums)
    return norms, update


def lamb_phase2(params, model_params, updates, segments, step_sizes, lr=None):
    """`lamb_phase2`: w -= step_sizes[slot] * update over the segments, then the low-precision
    copies, given phase 1's updates. `lr`: every slot steps by this (no trust ratio), which
    saves the per-element step buffer."""
    rows, whole, slots, lengths = _segments(segments, params)
    if not rows:
        return
    w = _views(params, rows, whole)
    if lr is not None:
        torch._foreach_add_(w, updates, alpha=-lr)
    else:
        per_element = torch.repeat_interleave(step_sizes[slots], lengths,
                                              output_size=sum(r[2] for r in rows))
        steps = [s.view_as(u) for s, u in zip(per_element.split([r[2] for r in rows]), updates)]
        torch._foreach_addcmul_(w, updates, steps, value=-1.0)
    if model_params:
        torch._foreach_copy_(_views(model_params, rows, whole), w)


def adamw_step(params, model_params, grads, exp_avg, exp_avg_sq, clip, lr, beta1, beta2, eps,
               weight_decay, step: int, clipping: bool = True):
    """`adamw_step` through torch's fused AdamW; `step` is the 1-based step count (bias
    correction); `clipping=False` skips the multiplication by 1 / clip (clip is 1 then)."""
    if grads[0].dtype != torch.float32:
        grads = [g.float() for g in grads]
        if clipping:
            torch._foreach_mul_(grads, clip.reshape(()).reciprocal())
    elif clipping:
        grads = torch._foreach_mul(grads, clip.reshape(()).reciprocal())
    # The kernel reads each tensor's step count; one device scalar serves them all (a fill, no copy).
    count = torch.full((), float(step), dtype=torch.float32, device=params[0].device)
    torch._fused_adamw_(list(params), list(grads), list(exp_avg), list(exp_avg_sq), [],
                        [count] * len(params), lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                        weight_decay=float(weight_decay), eps=float(eps), amsgrad=False, maximize=False)
    if model_params:
        torch._foreach_copy_(list(model_params), list(params))
