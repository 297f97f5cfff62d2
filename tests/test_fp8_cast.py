"""kernels/fp8_cast.py under the Triton interpreter: the fused amax + scale + cast (+ transpose, +
padding) against its eager reference bit for bit, its float32 -> fp8 rounding against torch's for
every neighbourhood of the fp8 grids, non-finite and zero tensors, argument errors, and the launches
per FP8 GEMM (bert_fast/ops/fp8.py on the kernel path) against the eager path's.

Under the interpreter the kernels round in integer arithmetic (the interpreter's own fp8 conversion
truncates; see the kernel module's docstring); the compiled kernels' hardware conversion is checked
against the same reference in tests/gpu/test_fp8_gpu.py."""

from __future__ import annotations

import pytest
import torch

from bert_fast.kernels import fp8_cast as fc
from bert_fast.ops import fp8, fp8_state
from bert_fast.ops.fp8 import Fp8Recipe, Fp8State
from helpers import KernelCensus

FORMATS = [fc.E4M3, fc.E5M2]
# (shape, padded shape or None): one tile, odd sizes, several tiles per program, BERT-like widths.
SHAPES = [((1, 1), (16, 16)), ((5, 9), None), ((37, 200), (48, 208)), ((64, 128), None), ((300, 260), None)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _grid_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite fp8 value, the midpoints between neighbours and the float32 values either side
    of each midpoint (ties and near-ties, carries into the next binade, subnormals, the largest
    value), negated too, and random magnitudes across the range."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = codes[torch.isfinite(codes)].unique()
    grid = grid[grid >= 0]
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9))])
    top = fc.FORMATS[dtype][2]
    tiny = grid[1]  # the smallest subnormal
    extra = torch.tensor([0.0, tiny / 4, tiny / 2, tiny * 0.51, top, top * 1.03, top * 1.1, 3.0e38])
    g = torch.Generator().manual_seed(0)
    random = torch.exp(torch.empty(20000).uniform_(-25.0, 11.5, generator=g))
    values = torch.cat([grid, near, extra, random])
    return torch.cat([values, -values])


@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_the_interpreted_rounding_is_torchs_for_every_neighbourhood_of_the_grid(dtype):
    """A delayed scale of 1 casts the values as they are: clamp to +-max, round to nearest even."""
    top = fc.FORMATS[dtype][2]
    values = _grid_values(dtype)
    values = torch.cat([values, torch.zeros((-values.numel()) % 128)]).reshape(-1, 128)
    scale = torch.ones(1)
    q, _, _, _ = fc.cast(values, dtype, scale=scale)
    want = values.clamp(-top, top).to(dtype)
    assert torch.equal(_bits(q), _bits(want)), values[_bits(q) != _bits(want)][:10]


def _state_args(mode: str, slot: int = 1):
    """cast()'s scaling arguments per mode: current; delayed with a scale; delayed with an empty
    history (scale 0: the amax pass runs and it scales currently); delayed with a scale the caller
    vouches for (`scaled`: a primed state, no amax pass). Buffers of 3 slots, as a state's."""
    if mode == "current":
        return {}
    stored = 0.0 if mode == "delayed-empty" else 0.37
    return dict(scale=torch.tensor([5.0, stored, 9.0]), amax_now=torch.tensor([1.0, 2.5, 3.0]), slot=slot,
                **({"scaled": True, "ticket": torch.zeros(1, dtype=torch.int32)} if mode == "scaled" else {}))


def _reference_args(mode: str, slot: int = 1) -> dict:
    args = _state_args(mode, slot)
    return {k: v for k, v in args.items() if k not in ("scaled", "ticket")}


MODES = ["current", "delayed", "delayed-empty", "scaled"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("shape, padded", SHAPES, ids=lambda s: "x".join(map(str, s)) if s else "unpadded")
def test_cast_equals_the_reference_bit_for_bit(shape, padded, dtype, mode):
    g = torch.Generator().manual_seed(sum(shape))
    for x_dtype, magnitude in ((torch.float32, 3.0), (torch.bfloat16, 1e-3), (torch.float16, 40.0)):
        x = (torch.randn(*shape, generator=g) * magnitude).to(x_dtype)
        rows, cols = padded or shape
        args, ref_args = _state_args(mode), _reference_args(mode)
        q, qt, inv, amax = fc.cast(x, dtype, rows=rows, cols=cols, transpose=True, **args)
        rq, rqt, rinv, ramax = fc.cast_reference(x, dtype, rows=rows, cols=cols, **ref_args)
        assert q.shape == (rows, cols) and qt.shape == (cols, rows) and q.dtype == qt.dtype == dtype
        assert torch.equal(_bits(q), _bits(rq)) and torch.equal(_bits(qt), _bits(rqt)), (x_dtype, mode)
        assert torch.equal(inv, rinv) and torch.equal(amax, ramax) and amax == x.float().abs().max()
        if mode != "current":
            assert torch.equal(args["amax_now"], ref_args["amax_now"])
            assert args["amax_now"].tolist() == [1.0, max(2.5, amax.item()), 3.0]  # its slot only
        if mode == "scaled":
            assert args["ticket"].item() == 0  # put back for the state's next cast


# 300 x 200 is 10 tiles over 3 interpreted programs, in order: tile 0 is the first's, tile 2 (rows
# 64-127, columns 0-127) the last's.
def test_delayed_casts_finish_in_their_last_program_and_leave_the_ticket_at_zero():
    """Delayed scaling's finish (amax, 1 / scale, the record) runs in the cast pass's program that
    takes the last ticket, reading every program's partial, and puts the ticket back to 0: casts
    one after another share the state's ticket, with no amax pass or fill between them to zero it
    (a ticket left at the count would let no program finish the next cast). The amax sits in the
    first program's tiles (the finisher reads another's partial) or in the last one's (a finisher
    too early would not have it)."""
    ticket = torch.zeros(1, dtype=torch.int32)
    assert fc.programs(ticket.device, 300, 200) > 1
    for peak, scaled in (((0, 0), True), ((64, 0), True), ((0, 0), False), ((64, 0), True)):
        x = torch.randn(300, 200)
        x[peak] = 100.0
        args, ref = _state_args("delayed"), _reference_args("delayed")
        q, qt, inv, amax = fc.cast(x, fc.E4M3, transpose=True, ticket=ticket, scaled=scaled, **args)
        rq, rqt, rinv, ramax = fc.cast_reference(x, fc.E4M3, **ref)
        assert torch.equal(inv, rinv) and amax == ramax == 100.0, (peak, scaled)
        assert torch.equal(args["amax_now"], ref["amax_now"]) and args["amax_now"][1] == 100.0
        assert torch.equal(_bits(q), _bits(rq)) and torch.equal(_bits(qt), _bits(rqt))
        assert ticket.item() == 0, (peak, scaled)


@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_a_scaled_cast_of_an_empty_slot_scales_by_one(dtype):
    """`scaled` promises a positive scale; were the slot's scale 0 after all (a state whose host
    count ran ahead of its buffers), no amax pass ran to scale currently: the pass and its inverse
    scale both take 1, so the GEMM's result stays right, at FP8's range around 1."""
    x = torch.randn(70, 50) * 30
    args = _state_args("delayed-empty")
    q, qt, inv, amax = fc.cast(x, dtype, transpose=True, scaled=True, **args)
    rq, rqt, rinv, _ = fc.cast_reference(x, dtype, scale=torch.tensor([1.0]), slot=0)
    assert inv == 1.0 and torch.equal(_bits(q), _bits(rq)) and torch.equal(_bits(qt), _bits(rqt))
    assert args["amax_now"][1] == amax == x.abs().max()


@pytest.mark.parametrize("rowwise, transpose", [(True, False), (False, True)])
def test_one_layout_alone_and_a_strided_input(rowwise, transpose):
    base = torch.randn(40, 96)
    x = base[3:33, 8:72]  # row stride 96, not the width
    q, qt, inv, _ = fc.cast(x, fc.E4M3, rows=32, cols=64, rowwise=rowwise, transpose=transpose)
    rq, rqt, rinv, _ = fc.cast_reference(x, fc.E4M3, rows=32, cols=64)
    assert torch.equal(inv, rinv)
    if rowwise:
        assert torch.equal(_bits(q), _bits(rq)) and qt.numel() == 0
    else:
        assert torch.equal(_bits(qt), _bits(rqt)) and q.numel() == 0


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the interpreter's max over the NaN flag's input
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", MODES)
def test_a_non_finite_tensor_gets_a_nan_inverse_scale_and_no_record(bad, mode):
    x = torch.randn(37, 40)
    x[20, 7] = bad
    args = _state_args(mode)
    q, qt, inv, amax = fc.cast(x, fc.E5M2, rows=48, cols=48, transpose=True, **args)
    assert torch.isnan(inv) and not torch.isfinite(amax)
    if mode != "current":
        assert args["amax_now"].tolist() == [1.0, 2.5, 3.0]
    # What any GEMM with it gives: NaN everywhere, as bert_fast.ops.fp8's eager path.
    assert torch.isnan(q.float()[:37, :40] * inv).all()
    assert not _bits(q)[37:].any() and not _bits(q)[:, 40:].any()  # the padding stays zeros
    if mode not in ("delayed", "scaled"):  # scaled currently: the values themselves are NaN
        assert torch.isnan(q.float()[:37, :40]).all() and torch.equal(_bits(qt), _bits(q).t())


def test_zeros_cast_to_zeros_with_scale_one():
    q, _, inv, amax = fc.cast(torch.zeros(7, 33), fc.E4M3)
    assert not _bits(q).any() and inv == 1.0 and amax == 0.0


def test_bad_arguments_are_named():
    x = torch.randn(8, 16)
    with pytest.raises(TypeError, match="dtype must be"):
        fc.cast(x, torch.bfloat16)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        fc.cast(x[0], fc.E4M3)
    with pytest.raises(ValueError, match="x must not be empty"):
        fc.cast(x[:0], fc.E4M3)
    with pytest.raises(ValueError, match="rows, cols must be at least"):
        fc.cast(x, fc.E4M3, rows=4)
    with pytest.raises(ValueError, match="scale must be a contiguous 1-D float32 tensor .* slot 3"):
        fc.cast(x, fc.E4M3, scale=torch.ones(3), slot=3)
    with pytest.raises(ValueError, match="amax_now, ticket and scaled are delayed scaling's"):
        fc.cast(x, fc.E4M3, amax_now=torch.ones(3))
    with pytest.raises(ValueError, match="amax_now, ticket and scaled are delayed scaling's"):
        fc.cast(x, fc.E4M3, scaled=True)
    with pytest.raises(ValueError, match=r"ticket must be an int32 tensor of shape \(1,\)"):
        fc.cast(x, fc.E4M3, scale=torch.ones(3), ticket=torch.zeros(1))
    with pytest.raises(ValueError, match="nothing to write"):
        fc.cast(x, fc.E4M3, rowwise=False)


# ---- launches per FP8 GEMM ----------------------------------------------------------------------

def _count_step(monkeypatch, scaling: str, kernels: bool) -> list[dict]:
    """Launches of fp8_linear forward and backward (bf16 x [37, 64], W [48, 64], as CUDA runs it:
    `_scaled_mm`, dimensions padded to 16), three micro-batches on unchanged weights."""
    monkeypatch.setattr(fp8, "_pads", lambda device: True)
    monkeypatch.setattr(fp8_state, "_use_kernels", lambda device: kernels)
    state = Fp8State(Fp8Recipe(scaling))
    w = (torch.randn(48, 64) * 0.05).bfloat16().requires_grad_()
    counts = []
    for _ in range(3):
        x = torch.randn(37, 64).bfloat16().requires_grad_()
        if state.delayed:
            fp8.roll([state])
        with KernelCensus() as forward:
            y = fp8.fp8_linear(x, w, state, emulate=False)
        grad = torch.randn_like(y)
        w.grad = None
        with KernelCensus() as backward:
            y.backward(grad)
        counts.append({"forward": forward.total(), "backward": backward.total(),
                       "kernels": sum(forward.triton.values()) + sum(backward.triton.values()),
                       "ops": dict(forward.aten + backward.aten)})
    return counts


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_launches_per_gemm_fall_from_about_90_to_under_12(monkeypatch, scaling):
    """The eager casts (what CUDA ran before these kernels): 56 + 35 launches per micro-batch under
    current scaling, 76 + 45 under delayed (commit b424900, bf16, this shape). The kernel path: per
    operand 2 cast launches (amax, cast) under current scaling and on delayed scaling's first
    micro-batch (its history is empty), 1 after (the state is primed; the finish runs in the cast's
    last program); the weight's only on the first micro-batch of an optimizer step (later ones
    reuse it; delayed scaling records its amax again: one op, and on the first reuse one more to
    keep it, 0 if not finite); and the three `_scaled_mm`; no transposes, pads or clones."""
    eager = _count_step(monkeypatch, scaling, kernels=False)
    fused = _count_step(monkeypatch, scaling, kernels=True)
    delayed = scaling == "delayed"
    first, later = 2, 1 if delayed else 2  # cast launches per operand: unprimed, primed
    assert [c["kernels"] for c in fused] == [3 * first, 2 * later, 2 * later]
    gemm_ops = {"_scaled_mm": 3}
    assert fused[0]["ops"] == gemm_ops
    assert fused[1]["ops"] == (gemm_ops if not delayed else {**gemm_ops, "nan_to_num": 1, "maximum": 1})
    assert fused[2]["ops"] == (gemm_ops if not delayed else {**gemm_ops, "maximum": 1})
    assert [c["forward"] + c["backward"] for c in fused] == [3 * first + 3, 2 * later + 3 + 2 * delayed,
                                                             2 * later + 3 + delayed]
    assert all(c["forward"] + c["backward"] >= 60 for c in eager), eager  # the eager casts, still on CPU


# ---- what torch.compile believes the kernels write ----------------------------------------------

# Run compiled (TRITON_INTERPRET=0: torch analyses TTIR, which interpreted kernels have none), with a
# stand-in for the CUDA driver where torch reads the target: sm_90.
_WRITTEN = """
import itertools, json, torch, triton
from triton.backends.compiler import GPUTarget
from bert_fast.kernels import fp8_cast as fc

class Sm90:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Sm90())

try:
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    def written(kernel, **kwargs):
        return sorted(dep.name for dep in identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes)
except ImportError:  # torch 2.11 (the GPU machines'): the same analysis, returning the names
    from torch._higher_order_ops.triton_kernel_wrap import identify_mutated_tensors

    def written(kernel, **kwargs):
        return sorted(identify_mutated_tensors(kernel, kwargs, {}))

x = torch.randn(64, 128, dtype=torch.bfloat16)
tensors = dict(X=x, Pre=x.clone(), ColBias=torch.randn(128, dtype=torch.bfloat16), Scale=torch.ones(3),
               Partial=torch.empty(4))
outputs = dict(Ticket=torch.zeros(1, dtype=torch.int32), DBias=torch.empty(1, 128), Q=torch.empty(64, 128, dtype=fc.E4M3),
               QT=torch.empty(128, 64, dtype=fc.E4M3), AmaxIn=torch.empty(4), AmaxNow=torch.zeros(3),
               InvScale=torch.empty(()), AmaxOut=torch.empty(()))
sizes = dict(n_rows=64, n_cols=128, stride_x_row=128, slot=1)
rows = []
for prologue in (0, 1, 2):
    flags = dict(PROLOGUE=prologue, GELU_TANH=False, SOFT=False, BLOCK_M=fc.BLOCK_M, BLOCK_N=fc.BLOCK_N)
    for delayed in (False, True):
        rows.append(["amax", prologue, delayed, False, True, False,
                     written(fc._fp8_amax_kernel, **tensors, **sizes, **flags, SKIP_IF_SCALED=delayed)])
    for (delayed, record), (rowwise, transpose) in itertools.product(
            ((False, False), (True, False), (True, True)), ((True, False), (False, True), (True, True))):
        rows.append(["cast", prologue, delayed, record, rowwise, transpose, written(
            fc._fp8_cast_kernel, **tensors, **outputs, **sizes, **flags, out_rows=64, out_cols=128, n_amax_in=4,
            FP8_MAX=448.0, MANT=3, BIAS=7, DELAYED=delayed, SCALED=False, RECORD=record, ROWWISE=rowwise,
            TRANSPOSE=transpose,
            BLOCK_P=4, BLOCK_F=4)])
print(json.dumps(rows))
"""


def test_torch_compile_sees_exactly_what_each_cast_kernel_writes():
    """Under torch.compile the casts run in the bert_fast::fp8_cast triton_op, and torch learns what
    each kernel writes from its TTIR (torch._higher_order_ops.triton_kernel_wrap): a tensor counted
    as written that is used later is cloned around the launch. The analysis must find the outputs,
    the finish's included (a subroutine: amax, 1 / scale, the record), and nothing only read: x, y,
    the bias, the scale, the amax pass's partials. (Store addresses taken back from a load helper
    once made it count x, y and the bias as written: a clone of x per cast.) Every prologue, scaling
    and layout."""
    import json

    from helpers import trace_with_fake_tensors

    rows = json.loads(trace_with_fake_tensors(_WRITTEN).splitlines()[-1])
    assert len(rows) == 3 * (2 + 9)
    for kernel, prologue, delayed, record, rowwise, transpose, written in rows:
        if kernel == "amax":
            want = {"Partial"}
        else:
            want = {"InvScale", "AmaxOut"}.union(*(names for names, on in (
                ({"Q"}, rowwise), ({"QT"}, transpose), ({"DBias"}, prologue == 2),
                ({"Partial", "Ticket"}, delayed), ({"AmaxNow"}, record)) if on))
        assert set(written) == want, (kernel, prologue, delayed, record, rowwise, transpose)
