"""FP8 GEMMs on CUDA (compute capability >= 8.9): `torch._scaled_mm` against the float32 emulation the
CPU tests check (equal up to accumulation order) at BERT-large shapes and at shapes that need
padding to multiples of 16, and the fast backend's training step in FP8 against bf16."""

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.ops import fp8, fp8_state
from helpers import padded_batch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_fp8():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability >= 8.9")


@pytest.mark.parametrize("shape", [(4096, 1024, 3072), (4096, 4096, 1024), (1000, 1024, 1024), (37, 72, 40)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("grad_format", ["e5m2", "e4m3"])
def test_scaled_mm_equals_the_emulation(shape, grad_format):
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    dy = (torch.randn(m, n, device="cuda", generator=g) * 1e-4).bfloat16()
    results = []
    for emulate in (False, True):
        state = fp8.Fp8State(fp8.Fp8Recipe(grad_format=grad_format))
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xs, ws, state, emulate=emulate)
        y.backward(dy)
        results.append([y.float(), xs.grad.float(), ws.grad.float()])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        # Both sum exact FP8 products in float32 and round once to bf16: one bf16 ulp apart at most.
        assert ((got - want).abs() <= want.abs() * 2.0**-7 + 1e-6 * want.abs().max()).all()


@pytest.mark.parametrize("shape", [(4096, 1024, 3072), (4096, 4096, 1024)], ids=lambda s: "x".join(map(str, s)))
def test_fast_accumulation_stays_close_to_exact_sums(shape):
    """precision.fp8_fast_accum (forward GEMMs only) against the exact float32 emulation, at
    BERT-large's widest reductions (K = 4096: FFN out): Hopper's fast FP8 accumulation keeps fewer
    bits than float32, so this bounds what it costs; the bound is loose, the error is printed."""
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    state = fp8.Fp8State(fp8.Fp8Recipe(fast_accum=True))
    fast = fp8.fp8_linear(x, w, state).float()
    exact = fp8.fp8_linear(x, w, state, emulate=True).float()
    error = ((fast - exact).norm() / exact.norm()).item()
    print(f"fast accumulation {shape}: relative error {error:.2e}")
    assert torch.isfinite(fast).all() and error < 1e-2


def test_fast_backend_step_in_fp8_is_close_to_bf16():
    config = BertConfig.from_preset("base", vocab_size=30522, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    batch = {k: v.cuda() for k, v in padded_batch(config, [128] * 8 + [77] * 8, 128).items()}
    losses, grads = [], []
    for scaling in (None, "current", "delayed"):
        torch.manual_seed(0)
        model = BertForPreTraining(config)
        if scaling:
            fp8.enable(model, fp8.Fp8Recipe(scaling))
        model = model.cuda().bfloat16().train()
        for _ in range(2):
            model.zero_grad()
            out = model(**batch)
            out.loss.backward()
        losses.append(out.loss.float().item())
        grads.append(model.bert.layers[-1].ffn_in.weight.grad.float())
    for loss, grad in zip(losses[1:], grads[1:]):
        assert abs(loss - losses[0]) < 0.01 * losses[0], losses
        assert ((grad - grads[0]).norm() / grads[0].norm()).item() < 0.15


def _bits_agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bytes, except that NaN need only be NaN (the hardware's NaN byte may differ)."""
    g, w = got.view(torch.uint8), want.view(torch.uint8)
    nan = torch.isnan(want.float())
    return bool(torch.equal(torch.isnan(got.float()), nan) and torch.equal(g[~nan], w[~nan]))


@pytest.mark.parametrize("mode", ["current", "delayed", "delayed-empty"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("shape, padded", [((4096, 1024), None), ((1000, 4096), (1008, 4096)), ((37, 72), (48, 80))],
                         ids=lambda s: "x".join(map(str, s)) if s else "unpadded")
def test_compiled_cast_kernels_equal_the_reference_bit_for_bit(shape, padded, dtype, mode):
    """The hardware conversion (cvt.rn.satfinite) against torch's clamp-then-cast, through every
    path of kernels/fp8_cast.py, with values past the format's range and a NaN-free input."""
    from bert_fast.kernels import fp8_cast as fc

    g = torch.Generator(device="cuda").manual_seed(0)
    for x_dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(*shape, device="cuda", generator=g) * 30).to(x_dtype)
        rows, cols = padded or shape
        args = {}
        if mode != "current":
            stored = 0.0 if mode == "delayed-empty" else 448.0 / 20  # saturates the largest values
            args = dict(scale=torch.tensor([1.0, stored, 1.0], device="cuda"), amax_now=torch.zeros(3, device="cuda"),
                        slot=1)
        ref = {k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()}
        q, qt, inv, amax = fc.cast(x, dtype, rows=rows, cols=cols, transpose=True, **args)
        rq, rqt, rinv, ramax = fc.cast_reference(x, dtype, rows=rows, cols=cols, **ref)
        assert _bits_agree(q, rq) and _bits_agree(qt, rqt), (x_dtype, mode)
        assert torch.equal(inv, rinv) and torch.equal(amax, ramax)
        if args:
            assert torch.equal(args["amax_now"], ref["amax_now"])


def test_every_delayed_cast_finishes_after_all_its_programs():
    """Delayed scaling's finish runs in the cast pass's program that takes the last ticket (an
    acq_rel atomic at GPU scope), which must see every program's amax partial, and puts the ticket
    back to 0 for the next cast. 64 casts back to back sharing one ticket, half of them with no
    amax pass before them (`scaled`, a primed state's), with the amax in a different program's
    tile each time, then 16 replays of one captured cast without an amax pass (nothing but the
    finish zeroes the ticket): each amax, inverse scale and record exact, the ticket 0 after."""
    from bert_fast.kernels import fp8_cast as fc

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 1024, device="cuda", generator=g).bfloat16()  # 1024 tiles, one per program
    scale, amax_now = torch.tensor([0.0, 4.0, 0.0], device="cuda"), torch.zeros(3, device="cuda")
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
    peaks = torch.randperm(x.numel(), device="cuda", generator=g)[:64]
    got, want = [], []
    for i, peak in enumerate(peaks.tolist()):
        y = x.clone()
        y.view(-1)[peak] = 100.0 + i
        _, _, inv, amax = fc.cast(y, torch.float8_e4m3fn, scale=scale, amax_now=amax_now, ticket=ticket,
                                  scaled=i % 2 == 1, slot=1, transpose=True)
        got.append(torch.stack([amax, inv]))
        want.append(torch.stack([y.float().abs().max(), torch.tensor(0.25, device="cuda")]))
    assert torch.equal(torch.stack(got), torch.stack(want))
    assert amax_now.tolist() == [0.0, float(torch.stack(want)[:, 0].max()), 0.0]
    assert ticket.item() == 0

    y = x.clone()
    args = dict(scale=scale, ticket=ticket, scaled=True, slot=1, transpose=True)
    fc.cast(y, torch.float8_e4m3fn, **args)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, _, inv, amax = fc.cast(y, torch.float8_e4m3fn, **args)
    got, want = [], []
    for i, peak in enumerate(peaks[:16].tolist()):
        y.copy_(x)
        y.view(-1)[peak] = -200.0 - i
        graph.replay()
        got.append(torch.stack([amax, inv]))
        want.append(torch.stack([y.float().abs().max(), torch.tensor(0.25, device="cuda")]))
    assert torch.equal(torch.stack(got), torch.stack(want)) and ticket.item() == 0


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_the_fused_casts_change_no_bit_of_the_gemms(scaling, monkeypatch):
    """fp8_linear with kernels/fp8_cast.py against the eager casts it replaced: the same FP8 bytes
    and scales reach `_scaled_mm` at the same padded shapes, so forward and gradients are equal."""
    x = torch.randn(1000, 1024, device="cuda").bfloat16()
    w = (torch.randn(4096, 1024, device="cuda") * 0.02).bfloat16()
    dy = (torch.randn(1000, 4096, device="cuda") * 1e-4).bfloat16()
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(fp8_state, "_use_kernels", lambda device, on=kernels: on)
        state = fp8.Fp8State(fp8.Fp8Recipe(scaling)).cuda()
        for _ in range(2):  # the second step scales from the first one's history under delayed
            fp8.roll([state])
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = fp8.fp8_linear(xs, ws, state)
            y.backward(dy)
        results.append([y, xs.grad, ws.grad])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("mode", ["current", "delayed"])
def test_compiled_gelu_casts_round_the_float64_values(mode, approximate):
    """kernels/fp8_cast.py's GELU prologues with the hardware conversion and ex2.approx / rcp.approx,
    at BERT-large's FFN width (tokens x 4096, padded rows), against float64 as the CPU tests check
    the interpreted ones (tests/test_fp8_gelu_cast.py); each transposed copy, reread from the bytes
    the pass has just stored, equal to its row-major one byte for byte."""
    from test_fp8_gelu_cast import _TOL, _assert_rounds, _gelu64, _gelu_grad64

    from bert_fast.kernels import fp8_cast as fc

    g = torch.Generator(device="cuda").manual_seed(0)
    y = (torch.randn(1000, 4096, device="cuda", generator=g) * 2.5).bfloat16()
    bias = (torch.randn(4096, device="cuda", generator=g) * 0.5).bfloat16()
    grad = (torch.randn(1000, 4096, device="cuda", generator=g) * 1e-3).bfloat16()

    def args():
        return {} if mode == "current" else dict(scale=torch.tensor([0.37, 0.0, 0.0], device="cuda"),
                                                 amax_now=torch.zeros(3, device="cuda"))

    u = y.double() + bias.double()
    q, qt, inv, _ = fc.cast_gelu(y, bias, fc.E4M3, approximate, rows=1008, cols=4096, transpose=True,
                                 **args())
    assert torch.equal(qt.view(torch.uint8), q.view(torch.uint8).t()) and not q.view(torch.uint8)[1000:].any()
    _assert_rounds(q[:1000], _gelu64(u, approximate), _TOL * (u.abs() + 1), 1 / inv.item(), fc.E4M3)
    q, qt, inv, _, dbias = fc.cast_gelu_grad(grad, y, bias, fc.E5M2, approximate, rows=1008, cols=4096,
                                             transpose=True, **args())
    assert torch.equal(qt.view(torch.uint8), q.view(torch.uint8).t()) and not q.view(torch.uint8)[1000:].any()
    exact = grad.double() * _gelu_grad64(u, approximate)
    slack = _TOL * grad.double().abs() * (1 + u.abs())
    _assert_rounds(q[:1000], exact, slack, 1 / inv.item(), fc.E5M2)
    assert ((dbias.double() - exact.sum(0)).abs() <= 1e-6 * 1000 * exact.abs().sum(0) + slack.sum(0)).all()


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_the_fused_gelu_ffn_is_close_to_the_unfused_one(scaling, monkeypatch):
    """BERT-large's FFN (1024 -> 4096 -> 1024) in FP8 with bias + GELU inside the casts against the
    unfused path (bf16 GELU, then the cast): they round h and its gradient differently (once
    from float32 against twice through bf16), nothing more."""
    from bert_fast import ops
    from bert_fast.ops import fp8_ffn

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2000, 1024, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(4096, 1024, device="cuda", generator=g) * 0.02).bfloat16()
    b1 = (torch.randn(4096, device="cuda", generator=g) * 0.1).bfloat16()
    w2 = (torch.randn(1024, 4096, device="cuda", generator=g) * 0.02).bfloat16()
    dy = (torch.randn(2000, 1024, device="cuda", generator=g) * 1e-4).bfloat16()
    results = []
    for fuse in (True, False):
        monkeypatch.setattr(fp8_ffn, "FUSE_GELU", fuse)
        states = [fp8.Fp8State(fp8.Fp8Recipe(scaling)).cuda() for _ in range(2)]
        for _ in range(2):  # the second step scales from the first one's history under delayed
            fp8.roll(states)
            leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2)]
            inner = ops.linear_gelu(*leaves[:3], fp8=states[0], fp8_next=states[1])
            out = ops.linear(inner, leaves[3], fp8=states[1])
            out.backward(dy)
        results.append([out.float(), *(t.grad.float() for t in leaves)])
    for got, want in zip(*results):
        assert torch.isfinite(got).all() and ((got - want).norm() / want.norm()).item() < 0.03


def test_an_fp16_gemm_result_past_65504_is_inf_not_saturated():
    """Under precision.fp16 the loss scaler finds overflow by a non-finite gradient: `_scaled_mm`
    into float16 must give inf where the product exceeds float16's range (the emulation's
    .to(float16) does), not clamp it to 65504."""
    a = torch.full((16, 32), 448.0, device="cuda").to(torch.float8_e4m3fn)
    b = torch.full((16, 32), 448.0, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    out = fp8.scaled_mm(a, b, one, one, torch.float16, emulate=False)  # 32 * 448^2 = 6.4e6
    emulated = fp8.scaled_mm(a, b, one, one, torch.float16, emulate=True)
    assert torch.isinf(emulated).all() and torch.isinf(out).all()


def test_compiled_roll_equals_the_eager_ops_bit_for_bit():
    """kernels/fp8_roll.py as built for the GPU (div.rn, the NaN flag beside a max that drops NaN)
    against its eager ops, on tests/test_fp8_roll.py's random and edge-case buffers."""
    from test_fp8_roll import _buffers, _edge_cases, _same

    from bert_fast.kernels import fp8_roll

    cases = [("random", _buffers(3, 16, seed, rolls=float(seed % 3))) for seed in range(4)]
    cases += _edge_cases(16) + _edge_cases(16, rolls=1.0) + _edge_cases(1)
    for name, buffers in cases:
        got = [t.cuda() for t in buffers]
        want = [t.clone() for t in got]
        for _ in range(3):
            fp8_roll.roll(*got)
            fp8_roll.roll_reference(*want)
            assert _same(got, want), (name, got, want)


@pytest.mark.parametrize("shape", [(4096, 1024, 3072), (1000, 1024, 1032)], ids=lambda s: "x".join(map(str, s)))
def test_the_bias_in_the_gemms_epilogue_equals_the_emulation(shape):
    """The QKV GEMM's bias in cuBLASLt's epilogue (`_scaled_mm(bias=)`, bf16, N padded to 16 in the
    second shape) against the emulation, which adds it to the float32 result before its rounding
    too: one bf16 ulp apart at most; the bias gradient is dY's column sums either way."""
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    b = (torch.randn(n, device="cuda", generator=g) * 0.5).bfloat16()
    dy = (torch.randn(m, n, device="cuda", generator=g) * 1e-4).bfloat16()
    results = []
    for emulate in (False, True):
        state = fp8.Fp8State(fp8.Fp8Recipe())
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fp8.fp8_linear(xs, ws, state, emulate=emulate, bias=bs)
        y.backward(dy)
        results.append([y.float(), xs.grad.float(), ws.grad.float(), bs.grad.float()])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert ((got - want).abs() <= want.abs() * 2.0**-7 + 1e-6 * want.abs().max()).all()
    # The bias is in: against the GEMM without it, the difference is the bias.
    plain = fp8.fp8_linear(x, w, fp8.Fp8State(fp8.Fp8Recipe())).float()
    assert ((results[0][0] - plain - b.float()).abs() <= 2.0**-7 * (plain.abs() + b.float().abs()) + 1e-3).all()
