"""LAMB's two fused passes in Triton, over many tensors per launch: the GPU fallback of
`torch.ops.bert_fast.lamb_phase1` / `lamb_phase2` where bert_fast._C has no CUDA kernels (a build
without a CUDA toolkit; Triton needs none). Same contract as the CUDA kernels (csrc/optim_kernels.cu):

- Segments (rows of tensor, start, length, slot): whole tensors, or under ZeRO the pieces of
  original tensors inside a flat partition. They are cut into chunks of 16384 elements, sorted by
  slot (csrc/optim_args.h `make_chunks`); one program per chunk. Elements outside every segment
  (ZeRO-3 padding) are never read or written.
- Multi-tensor: a device table of int64 addresses per tensor (w, g, m, v, model copy) that the
  kernels cast to typed pointers, and one of int64 chunk rows (tensor, start, length, slot).
  Addresses are cached per set of tensors, so a step re-uploads a table only when an allocation
  moved (new grads after `zero_grad(set_to_none=True)`).
- Phase 1 reads w, g, m, v and the clip factor, writes m, v and per-chunk float32 partial sums of
  w^2 and update^2; a finalize launch adds each slot's chunks in order (deterministic, no atomics).
  FusedLAMB all-reduces those [slots, 2] sums under ZeRO between the phases, where the CUDA path
  does. Phase 2 recomputes the update from m, v, w (nothing stored between the phases) and writes
  w -= step_sizes[slot] * update and, for bf16/fp16 parameters, the rounded model copy.
- Float32 math in the order of csrc/optim_math.h (`lamb_moments`, `lamb_update`), IEEE division
  and square root (`div_rn`, `sqrt_rn`, as nvcc without fast math), coefficients rounded from
  double on the host as csrc/optim.cpp `lamb_params` does. Grads float32, float16 or bfloat16;
  copies float16 or bfloat16; w, m, v float32.

Bytes per parameter, fp32 grads: phase 1 reads 16 and writes 8, phase 2 reads 12 and writes 4:
40 (bf16 grads and copy: 38 + 2 = 40, as the CUDA kernels; FusedLAMB's grad-norm pass adds one
read of the grads). The foreach fallback (bert_fast/optim/fallback.py) moves about 130.

Loops over a chunk run unmasked over whole blocks and masked over the tail; when every address
(and start) is 16-byte aligned (`ALIGNED`, checked on the host: whole tensors from the caching
allocator always are) the compiler is told so and emits 16-byte vector loads.

References: apex `multi_tensor_lamb.cu` (https://github.com/NVIDIA/apex), csrc/optim_kernels.cu.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

CHUNK = 16384  # csrc/optim_args.h kOptimChunk: elements per program
BLOCK = 1024  # elements per loop iteration of a program
NUM_WARPS = 4
FINALIZE_BLOCK = 128
_LISTS = 5  # table columns: w, g, m, v, model copy


@triton.jit
def _address(Table, tensor, COL: tl.constexpr, LIKE, start, ALIGNED: tl.constexpr):
    """Typed pointer to element `start` of column COL of tensor `tensor`; LIKE gives the type."""
    size: tl.constexpr = LIKE.dtype.element_ty.primitive_bitwidth // 8
    p = (tl.load(Table + tensor * 5 + COL) + start * size).to(LIKE.dtype)
    if ALIGNED:  # on the pointer (a hint on the integer is lost in the cast): 16-byte vectors
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _phase1_block(w_ptr, g_ptr, m_ptr, v_ptr, offs, n, inv_clip, beta1, one_minus_beta1, beta2,
                  one_minus_beta2, eps, weight_decay, inv_bc1, inv_bc2, acc_w, acc_u,
                  ADAM_W_MODE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    else:
        w = tl.load(w_ptr + offs)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    # lamb_moments: g * (1 / clip), L2 decay before the moments when not decoupled.
    g = g * inv_clip
    if not ADAM_W_MODE:
        g = g + weight_decay * w
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    # lamb_update
    u = tl.div_rn(m * inv_bc1, tl.sqrt_rn(v * inv_bc2) + eps)
    if ADAM_W_MODE:
        u = u + weight_decay * w
    if MASKED:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        u = tl.where(mask, u, 0.0)  # w is 0 there already
    else:
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
    return acc_w + w * w, acc_u + u * u


@triton.jit
def _lamb_phase1_kernel(
    Table,  # [tensors, 5] int64 addresses: w, g, m, v, copy
    Chunks,  # [chunks, 4] int64: tensor, start, length, slot (sorted by slot)
    Clip,  # [1] fp32: grads are divided by it
    Partial,  # [chunks, 2] fp32 out: sums of w^2, update^2 of each chunk
    W0, G0,  # the first tensor's w and g: their element types type the table's addresses
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, inv_bc1, inv_bc2,
    ADAM_W_MODE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    tensor = tl.load(Chunks + chunk * 4)
    start = tl.load(Chunks + chunk * 4 + 1)
    n = tl.load(Chunks + chunk * 4 + 2)
    w_ptr = _address(Table, tensor, 0, W0, start, ALIGNED)
    g_ptr = _address(Table, tensor, 1, G0, start, ALIGNED)
    m_ptr = _address(Table, tensor, 2, W0, start, ALIGNED)
    v_ptr = _address(Table, tensor, 3, W0, start, ALIGNED)
    inv_clip = tl.div_rn(1.0, tl.load(Clip))
    offs = tl.arange(0, BLOCK)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    full = n - n % BLOCK
    for base in range(0, full, BLOCK):
        idx = tl.max_contiguous(tl.multiple_of(base + offs, BLOCK), BLOCK)
        acc_w, acc_u = _phase1_block(w_ptr, g_ptr, m_ptr, v_ptr, idx, n,
                                     inv_clip, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                     weight_decay, inv_bc1, inv_bc2, acc_w, acc_u, ADAM_W_MODE, False)
    if full < n:
        acc_w, acc_u = _phase1_block(w_ptr + full, g_ptr + full, m_ptr + full, v_ptr + full, offs, n - full,
                                     inv_clip, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                     weight_decay, inv_bc1, inv_bc2, acc_w, acc_u, ADAM_W_MODE, True)
    tl.store(Partial + chunk * 2, tl.sum(acc_w, axis=0))
    tl.store(Partial + chunk * 2 + 1, tl.sum(acc_u, axis=0))


@triton.jit
def _lamb_finalize_kernel(
    Partial,  # [chunks, 2] fp32
    SlotBegin,  # [slots + 1] int64: the chunk range of each slot
    Norms,  # [slots, 2] fp32 out
    BLOCK: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    begin = tl.load(SlotBegin + slot)
    end = tl.load(SlotBegin + slot + 1)
    offs = tl.arange(0, BLOCK)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(begin, end, BLOCK):
        mask = c + offs < end
        acc_w += tl.load(Partial + (c + offs) * 2, mask=mask, other=0.0)
        acc_u += tl.load(Partial + (c + offs) * 2 + 1, mask=mask, other=0.0)
    tl.store(Norms + slot * 2, tl.sum(acc_w, axis=0))
    tl.store(Norms + slot * 2 + 1, tl.sum(acc_u, axis=0))


@triton.jit
def _phase2_block(w_ptr, m_ptr, v_ptr, c_ptr, offs, n, step, eps, weight_decay, inv_bc1, inv_bc2,
                  ADAM_W_MODE: tl.constexpr, HAS_COPY: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    else:
        w = tl.load(w_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    u = tl.div_rn(m * inv_bc1, tl.sqrt_rn(v * inv_bc2) + eps)
    if ADAM_W_MODE:
        u = u + weight_decay * w
    out = w - step * u
    if MASKED:
        tl.store(w_ptr + offs, out, mask=mask)
        if HAS_COPY:
            tl.store(c_ptr + offs, out.to(c_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    else:
        tl.store(w_ptr + offs, out)
        if HAS_COPY:
            tl.store(c_ptr + offs, out.to(c_ptr.dtype.element_ty, fp_downcast_rounding="rtne"))


@triton.jit
def _lamb_phase2_kernel(
    Table,  # [tensors, 5] int64 addresses: w, g, m, v, copy
    Chunks,  # [chunks, 4] int64: tensor, start, length, slot
    StepSizes,  # [slots] fp32: lr * trust of each slot
    W0, C0,  # the first tensor's w and model copy (w again when there is none): element types
    eps, weight_decay, inv_bc1, inv_bc2,
    ADAM_W_MODE: tl.constexpr, HAS_COPY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    tensor = tl.load(Chunks + chunk * 4)
    start = tl.load(Chunks + chunk * 4 + 1)
    n = tl.load(Chunks + chunk * 4 + 2)
    step = tl.load(StepSizes + tl.load(Chunks + chunk * 4 + 3))
    w_ptr = _address(Table, tensor, 0, W0, start, ALIGNED)
    m_ptr = _address(Table, tensor, 2, W0, start, ALIGNED)
    v_ptr = _address(Table, tensor, 3, W0, start, ALIGNED)
    if HAS_COPY:
        c_ptr = _address(Table, tensor, 4, C0, start, ALIGNED)
    else:
        c_ptr = w_ptr
    offs = tl.arange(0, BLOCK)
    full = n - n % BLOCK
    for base in range(0, full, BLOCK):
        idx = tl.max_contiguous(tl.multiple_of(base + offs, BLOCK), BLOCK)
        _phase2_block(w_ptr, m_ptr, v_ptr, c_ptr, idx, n, step, eps,
                      weight_decay, inv_bc1, inv_bc2, ADAM_W_MODE, HAS_COPY, False)
    if full < n:
        _phase2_block(w_ptr + full, m_ptr + full, v_ptr + full, c_ptr + full, offs, n - full, step, eps,
                      weight_decay, inv_bc1, inv_bc2, ADAM_W_MODE, HAS_COPY, True)


def _f32(x: float) -> float:
    """`x` rounded to float32, as csrc/optim.cpp hands the kernels their coefficients (on the
    host, without a tensor: no `aten._local_scalar_dense` in a step)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def lamb_coefficients(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2) -> dict:
    """csrc/optim.cpp `lamb_params`: computed in double, rounded to float32 once."""
    return dict(beta1=_f32(beta1), one_minus_beta1=_f32(1.0 - beta1), beta2=_f32(beta2),
                one_minus_beta2=_f32(1.0 - beta2), eps=_f32(eps), weight_decay=_f32(weight_decay),
                inv_bc1=_f32(1.0 / bias_correction1), inv_bc2=_f32(1.0 / bias_correction2))


class _Plan:
    """The chunk table of one segments tensor on one device, and its address tables by
    allocation (a few at most: the grads' addresses alternate between steps at most)."""

    def __init__(self, segments: torch.Tensor, numels: list[int], num_slots: int, device):
        if (segments.device.type != "cpu" or segments.dtype != torch.int64 or segments.dim() != 2
                or segments.shape[1] != 4):
            raise ValueError(f"segments must be an int64 CPU tensor of shape [n, 4], got {segments.dtype} "
                             f"{tuple(segments.shape)} on {segments.device}")
        chunks = []
        for i, (t, start, length, slot) in enumerate(segments.tolist()):
            # As csrc/optim_args.h make_chunks: a bad row would make the kernels touch memory
            # outside the tensors.
            if not (0 <= t < len(numels) and 0 <= start <= numels[t] and 0 <= length <= numels[t] - start
                    and 0 <= slot < num_slots):
                raise ValueError(f"segments[{i}] = ({t}, {start}, {length}, {slot}) lies outside the "
                                 f"{len(numels)} tensors or the {num_slots} slots")
            for c in range(0, length, CHUNK):
                chunks.append((t, start + c, min(CHUNK, length - c), slot))
        chunks.sort(key=lambda c: c[3])  # stable: each slot's chunks in segment order
        counts = [0] * (num_slots + 1)
        for c in chunks:
            counts[c[3] + 1] += 1
        for s in range(num_slots):
            counts[s + 1] += counts[s]
        self.segments = segments
        self.numels = numels
        self.num_chunks = len(chunks)
        self.starts = sorted({(c[0], c[1]) for c in chunks})
        self.chunks = torch.tensor(chunks, dtype=torch.int64).reshape(-1, 4).to(device)
        self.slot_begin = torch.tensor(counts, dtype=torch.int64).to(device)
        self.tables: dict[tuple, tuple[torch.Tensor, bool]] = {}

    def table(self, lists: list[list[torch.Tensor]]) -> tuple[torch.Tensor, bool]:
        """[tensors, 5] int64 addresses of w, g, m, v, copy (0 where absent) on the device, and
        whether every chunk's start is 16-byte aligned in every list."""
        columns = [[t.data_ptr() for t in ts] if ts else [0] * len(lists[0]) for ts in lists]
        key = tuple(a for col in columns for a in col)
        hit = self.tables.get(key)
        if hit is None:
            _check_lists(lists)
            sizes = [ts[0].element_size() if ts else 0 for ts in lists]
            aligned = all(col[t] == 0 or (col[t] + start * size) % 16 == 0
                          for col, size in zip(columns, sizes) for t, start in self.starts)
            table = torch.tensor(list(zip(*columns)), dtype=torch.int64).reshape(-1, _LISTS)
            if len(self.tables) >= 4:
                self.tables.clear()
            hit = self.tables[key] = (table.to(lists[0][0].device), aligned)
        return hit


_NAMES = ("params", "grads", "exp_avg", "exp_avg_sq", "model_params")


def _check_lists(lists: list[list[torch.Tensor]]) -> None:
    """What the kernels assume of the tensors behind a new address table (csrc/optim_args.h
    checks the same): contiguous, on the params' device, one dtype per list, the params' sizes."""
    params = lists[0]
    for name, ts in zip(_NAMES, lists):
        if ts and len(ts) != len(params):
            raise ValueError(f"{name} has {len(ts)} tensors, expected {len(params)}")
        for i, (t, p) in enumerate(zip(ts, params)):
            same = t.device == p.device and t.dtype == ts[0].dtype and t.numel() == p.numel()
            if not (same and t.is_contiguous()):
                raise ValueError(f"{name}[{i}] must be contiguous, on {p.device}, {ts[0].dtype} and of "
                                 f"{p.numel()} elements; got {t.dtype} {tuple(t.shape)} on {t.device}"
                                 f"{'' if t.is_contiguous() else ', not contiguous'}")
    if params[0].dtype != torch.float32 or any(ts and ts[0].dtype != torch.float32 for ts in lists[2:4]):
        raise TypeError("params, exp_avg and exp_avg_sq must be float32")


_plans: dict[tuple[int, torch.device], _Plan] = {}


def _plan(segments: torch.Tensor, params: list[torch.Tensor], num_slots: int) -> _Plan:
    device = params[0].device
    key = (id(segments), device)
    plan = _plans.get(key)
    numels = [p.numel() for p in params]
    if plan is None or plan.segments is not segments or plan.numels != numels:
        plan = _plans[key] = _Plan(segments, numels, num_slots, device)
    return plan


def lamb_phase1(params, grads, exp_avg, exp_avg_sq, segments, num_slots, clip, beta1, beta2, eps,
                weight_decay, bias_correction1, bias_correction2, adam_w_mode) -> torch.Tensor:
    """`torch.ops.bert_fast.lamb_phase1`: m, v updated in place over the segments; returns the
    per-slot sums of squares of (w, update), float32 [num_slots, 2]. Arguments as the op's,
    validated by the caller (bert_fast.optim): contiguous float32 params and moments, float
    grads of one dtype, segments inside the tensors, clip a float32 [1] on the device."""
    device = params[0].device
    norms = torch.empty(num_slots, 2, dtype=torch.float32, device=device)
    if num_slots == 0:
        return norms
    plan = _plan(segments, params, num_slots)
    h = lamb_coefficients(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2)
    partial = torch.empty(max(plan.num_chunks, 1), 2, dtype=torch.float32, device=device)
    if plan.num_chunks:
        table, aligned = plan.table([params, grads, exp_avg, exp_avg_sq, []])
        _lamb_phase1_kernel[(plan.num_chunks,)](
            table, plan.chunks, clip, partial, params[0], grads[0], h["beta1"], h["one_minus_beta1"],
            h["beta2"], h["one_minus_beta2"], h["eps"], h["weight_decay"], h["inv_bc1"], h["inv_bc2"],
            ADAM_W_MODE=bool(adam_w_mode), ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _lamb_finalize_kernel[(num_slots,)](partial, plan.slot_begin, norms, BLOCK=FINALIZE_BLOCK, num_warps=4)
    return norms


def lamb_phase2(params, model_params, exp_avg, exp_avg_sq, segments, step_sizes, beta1, beta2, eps,
                weight_decay, bias_correction1, bias_correction2, adam_w_mode) -> None:
    """`torch.ops.bert_fast.lamb_phase2`: w -= step_sizes[slot] * update over the segments (the
    update recomputed from m, v, w), and the model copies (empty list: none) rounded from w."""
    plan = _plan(segments, params, step_sizes.numel())
    if not plan.num_chunks:
        return
    h = lamb_coefficients(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2)
    copies = list(model_params)
    table, aligned = plan.table([params, [], exp_avg, exp_avg_sq, copies])
    _lamb_phase2_kernel[(plan.num_chunks,)](
        table, plan.chunks, step_sizes, params[0], copies[0] if copies else params[0], h["eps"],
        h["weight_decay"], h["inv_bc1"], h["inv_bc2"], ADAM_W_MODE=bool(adam_w_mode),
        HAS_COPY=bool(copies), ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS)


def lamb_reference(params, grads, exp_avg, exp_avg_sq, segments, num_slots, clip, step_sizes_of, beta1,
                   beta2, eps, weight_decay, bias_correction1, bias_correction2, adam_w_mode):
    """Both phases in plain float64 PyTorch, segment by segment, in place on float64 copies the
    caller passes; `step_sizes_of(norms)` maps the [slots, 2] sums to per-slot step sizes.
    Returns the sums."""
    norms = torch.zeros(num_slots, 2, dtype=torch.float64)
    rows = segments.tolist()
    pieces = []
    for t, start, length, slot in rows:
        w, g, m, v = (x[t].view(-1).narrow(0, start, length) for x in (params, grads, exp_avg, exp_avg_sq))
        g = g.double() / clip.double()
        if not adam_w_mode:
            g = g + weight_decay * w
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        u = (m / bias_correction1) / ((v / bias_correction2).sqrt() + eps)
        if adam_w_mode:
            u = u + weight_decay * w
        norms[slot, 0] += (w * w).sum()
        norms[slot, 1] += (u * u).sum()
        pieces.append((w, u, slot))
    steps = step_sizes_of(norms)
    for w, u, slot in pieces:
        w.sub_(steps[slot] * u)
    return norms
