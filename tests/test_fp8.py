"""bert_fast.ops.fp8 and ops.linear(fp8=...): the FP8 GEMM against float64 from the same quantised operands
(equal up to accumulation order) and against float32 within FP8's rounding bound; scaling of zero,
huge and tiny tensors; delayed scaling's history; non-finite values surfacing; the model's wiring,
its state in checkpoints' state dicts, and the run's device checks."""

from __future__ import annotations

import pytest
import torch

from bert_fast import ops
from bert_fast.model import BertForPreTraining
from bert_fast.model.config import BertConfig
from bert_fast.ops import fp8, fp8_ffn
from bert_fast.ops.fp8 import E4M3, E5M2, Fp8Recipe, Fp8State
from bert_fast.train.config import ConfigError, load_config
from helpers import mlm_batch

# (unit roundoff: half an ulp relative, half the smallest subnormal absolute) per format.
ROUNDING = {E4M3: (2.0**-4, 2.0**-10), E5M2: (2.0**-3, 2.0**-17)}
SHAPES = [(1, 16, 16), (37, 64, 48), (5, 9, 11), (64, 128, 32)]


def _data(m, k, n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * scale
    w = torch.randn(n, k, generator=g) * 0.05 * scale
    dy = torch.randn(m, n, generator=g) * 1e-3 * scale
    return x, w, dy


def _current_scale(t, dtype):
    return fp8._scale_from_amax(t.abs().amax().float(), dtype)


def _dequant(t, dtype, scale):
    return fp8.quantize(t, dtype, scale).double() / scale.double()


def _bound(a, b, fmt_a, fmt_b, s_a, s_b):
    """Elementwise bound on |a_q @ b_q^T - a @ b^T| from each operand's rounding error (relative
    u, or absolute d/scale in the subnormal range) plus float32 accumulation of the products."""
    (u_a, d_a), (u_b, d_b) = ROUNDING[fmt_a], ROUNDING[fmt_b]
    a, b = a.double().abs(), b.double().abs()
    e_a = torch.maximum(a * u_a, torch.full_like(a, d_a / s_a.item()))
    e_b = torch.maximum(b * u_b, torch.full_like(b, d_b / s_b.item()))
    accumulate = (a + e_a) @ (b + e_b).t() * a.shape[1] * 2.0**-23
    return e_a @ b.t() + a @ e_b.t() + e_a @ e_b.t() + accumulate


def _run(x, w, dy, state=None, emulate=None):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.fp8_linear(x, w, state, emulate=emulate)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("emulate", [True, False], ids=["emulated", "scaled_mm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("grad_format", ["e5m2", "e4m3"])
def test_forward_and_backward_equal_float64_of_the_same_quantised_operands(shape, emulate, grad_format):
    """y = q(x) q(W)^T, dX = q(dY) q(W), dW = q(dY)^T q(X), each to float32 accumulation order;
    `torch._scaled_mm` (what CUDA runs; on the CPU a slow reference kernel) and the float32
    emulation alike."""
    x, w, dy = _data(*shape)
    state = Fp8State(Fp8Recipe(grad_format=grad_format))
    y, dx, dw = _run(x, w, dy, state, emulate)
    g = state.recipe.grad_dtype
    s_x, s_w, s_g = _current_scale(x, E4M3), _current_scale(w, E4M3), _current_scale(dy, g)
    qx, qw, qg = _dequant(x, E4M3, s_x), _dequant(w, E4M3, s_w), _dequant(dy, g, s_g)
    k = max(shape)
    for got, want in ((y, qx @ qw.t()), (dx, qg @ qw), (dw, qg.t() @ qx)):
        tol = k * 2.0**-23 * want.abs().max().item() + 1e-30
        err = (got.double() - want).abs().max().item()
        assert err <= tol, (err, tol)


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e-6, 1e-12], ids=["unit", "huge", "tiny", "tinier"])
@pytest.mark.parametrize("grad_format", ["e5m2", "e4m3"])
def test_error_against_float32_stays_within_the_fp8_rounding_bound(scale, grad_format):
    """Against the unquantised float64 product every entry errs within the bound the two operands'
    roundings allow; magnitudes far outside FP8's range (1e4 > 448, 1e-6 below e4m3's smallest
    subnormal 2^-9) are scaled into it: nothing overflows, nothing flushes to zero."""
    x, w, dy = _data(37, 64, 48, seed=1, scale=scale)
    g = fp8.GRAD_FORMATS[grad_format]
    y, dx, dw = _run(x, w, dy, Fp8State(Fp8Recipe(grad_format=grad_format)))
    s_x, s_w, s_g = _current_scale(x, E4M3), _current_scale(w, E4M3), _current_scale(dy, g)
    cases = ((y, x, w, E4M3, E4M3, s_x, s_w), (dx, dy, w.t(), g, E4M3, s_g, s_w),
             (dw, dy.t(), x.t(), g, E4M3, s_g, s_x))
    for got, a, b, fa, fb, sa, sb in cases:
        assert torch.isfinite(got).all()
        want = a.double() @ b.double().t()
        bound = _bound(a, b, fa, fb, sa, sb)
        assert ((got.double() - want).abs() <= bound * (1 + 1e-6)).all()
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < (0.05 if fa is E4M3 else 0.1), rel


def test_zero_tensors_give_zeros_not_nan():
    x, w, dy = torch.zeros(8, 32), torch.zeros(16, 32), torch.zeros(8, 16)
    for state in (None, Fp8State(Fp8Recipe("delayed"))):
        y, dx, dw = _run(x, w, dy, state)
        assert all(torch.equal(t, torch.zeros_like(t)) for t in (y, dx, dw))


def test_bf16_inputs_give_bf16_outputs_and_gradients():
    x, w, dy = (t.bfloat16() for t in _data(16, 32, 16))
    y, dx, dw = _run(x, w, dy)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    want = x.double() @ w.double().t()
    assert ((y.double() - want).norm() / want.norm()).item() < 0.05


def test_quantize_saturates_and_a_non_finite_tensor_gets_a_nan_scale():
    q = fp8.quantize(torch.tensor([1e6, -1e6, 3.0]), E4M3, torch.tensor(1.0)).float()
    assert q.tolist() == [448.0, -448.0, 3.0]
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.tensor([1.0, bad])
        # A plain .to(float8_e4m3fn) gives +-448 for inf on the CPU: the NaN scale keeps it visible.
        for state in (None, Fp8State(Fp8Recipe("delayed"))):
            scale = fp8._scale_for(t, E4M3, state, 0, record=True)
            assert torch.isnan(scale) and torch.isnan(fp8.quantize(t, E4M3, scale).float()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["x", "w", "dy"])
def test_non_finite_values_reach_the_output_and_stay_out_of_the_history(bad, where):
    x, w, dy = _data(8, 32, 16)
    {"x": x, "w": w, "dy": dy}[where][0, 0] = bad
    state = Fp8State(Fp8Recipe("delayed"))
    y, dx, dw = _run(x, w, dy, state)
    if where == "dy":
        assert torch.isfinite(y).all() and not torch.isfinite(dx).all() and not torch.isfinite(dw).all()
    else:
        assert not torch.isfinite(y).all()
    assert torch.isfinite(state.amax_now).all()
    fp8.roll([state])
    assert torch.isfinite(state.amax_history).all() and torch.isfinite(state.scale).all()


def test_delayed_scaling_records_rolls_and_scales_from_the_history_maximum():
    length = 3
    state = Fp8State(Fp8Recipe("delayed", "e5m2", length))
    assert state.scale.tolist() == [0.0, 0.0, 0.0]  # empty: the first step scales currently
    amaxes = []
    for step in range(5):
        x, w, dy = _data(16, 32, 16, seed=step, scale=2.0**step)
        used = state.scale.clone()
        y, _, _ = _run(x, w, dy, state)
        now = torch.stack([x.abs().amax(), w.abs().amax(), dy.abs().amax()])
        assert torch.equal(state.amax_now, now)
        s_x = used[0] if used[0] > 0 else _current_scale(x, E4M3)
        s_w = used[1] if used[1] > 0 else _current_scale(w, E4M3)
        want = fp8.linear_reference(x, w, s_x, s_w)
        assert (y.double() - want).abs().max() <= 64 * 2.0**-23 * want.abs().max()
        amaxes.insert(0, now)
        fp8.roll([state])
        history = torch.stack(amaxes[:length], dim=1)
        assert torch.equal(state.amax_history[:, :history.shape[1]], history)
        assert state.amax_now.tolist() == [0.0, 0.0, 0.0]
        top = torch.tensor([448.0, 448.0, 57344.0])
        assert torch.allclose(state.scale, top / history.amax(dim=1), rtol=1e-6)


def test_delayed_scale_older_than_a_jump_saturates_instead_of_overflowing():
    state = Fp8State(Fp8Recipe("delayed"))
    x, w, dy = _data(16, 32, 16)
    _run(x, w, dy, state)
    fp8.roll([state])
    y, dx, dw = _run(x * 1e3, w, dy, state)  # 1000x past the recorded amax: clipped at 448 / scale
    assert torch.isfinite(y).all() and torch.isfinite(dw).all()
    assert y.abs().max() <= (448.0 / state.scale[0]) * w.abs().sum(1).max() * 1.001


def test_an_empty_history_scales_currently_until_the_state_is_primed_then_by_one():
    """The first training forward (one roll, nothing recorded before it) casts with the current
    amax; from the second roll on the history holds a step, the state is primed (the host knows
    it without reading the device) and a role whose history is empty (here the gradient: all
    zeros) scales by 1, Transformer Engine's initial scale."""
    state = Fp8State(Fp8Recipe("delayed"))
    x, w, dy = _data(16, 32, 16)
    fp8.roll([state])
    assert not state.primed and state.scale.tolist() == [0.0, 0.0, 0.0]
    y, _, _ = _run(x, w, dy * 0, state)
    want = fp8.linear_reference(x, w, _current_scale(x, E4M3), _current_scale(w, E4M3))
    assert (y.double() - want).abs().max() <= 64 * 2.0**-23 * want.abs().max()
    fp8.roll([state])
    assert state.primed and state.rolls.item() == 2.0
    assert state.scale[2] == 1.0 and state.scale[0] == 448.0 / x.abs().max()
    assert fp8.cast(dy, E5M2, state, 2, record=False).inv == 1.0  # not dy's current scale


def test_the_roll_count_is_saved_and_a_state_saved_without_it_loads():
    recipe = Fp8Recipe("delayed")
    state = Fp8State(recipe)
    for _ in range(3):
        fp8.roll([state])
    saved = state.state_dict()
    assert saved["rolls"].item() == 2.0
    resumed = Fp8State(recipe)
    resumed.load_state_dict(saved)
    assert resumed.primed  # the host's count follows the loaded buffer
    # Saved before the count existed (strict: no error), into a state that had primed itself: its
    # count starts again (the loaded scales may be 0), and a ticket left over is cleared.
    older = Fp8State(recipe)
    for _ in range(3):
        fp8.roll([older])
    older.ticket.fill_(7)
    older.load_state_dict({k: v for k, v in saved.items() if k != "rolls"})
    assert not older.primed and older.rolls.item() == 0.0 and older.ticket.item() == 0


def test_evaluation_reads_but_does_not_record():
    state = Fp8State(Fp8Recipe("delayed"))
    x, w, _ = _data(8, 32, 16)
    with torch.no_grad():
        fp8.fp8_linear(x, w, state, record=False)
    assert state.amax_now.tolist() == [0.0, 0.0, 0.0]


def test_state_buffers_stay_float32_under_a_bf16_cast_and_are_named_as_state():
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=256))
    states = fp8.enable(model, Fp8Recipe("delayed", amax_history=5))
    assert len(states) == 4 * model.config.num_hidden_layers
    model.bfloat16()
    keys = [k for k in model.state_dict() if fp8.is_state_key(k)]
    assert len(keys) == 4 * len(states) and "bert.layers.1.fp8.ffn_out.amax_history" in keys
    assert "bert.layers.1.fp8.ffn_out.rolls" in keys and not any(k.endswith(".ticket") for k in keys)
    assert all(model.state_dict()[k].dtype == torch.float32 for k in keys)
    assert all(s.ticket.dtype == torch.int32 for s in states)  # not a float: bfloat16() leaves it
    assert not any(fp8.is_state_key(k) for k, _ in model.named_parameters())
    current = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=256))
    fp8.enable(current, Fp8Recipe("current"))
    assert not any(fp8.is_state_key(k) for k in current.state_dict())  # no state to keep


def _model(recipe=None, seed=0):
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=256, hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0))
    if recipe is not None:
        fp8.enable(model, recipe)
    return model


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_the_model_runs_its_four_gemms_per_layer_through_fp8_close_to_float32(scaling, monkeypatch):
    calls = []
    for module, name in ((fp8, "fp8_linear"), (fp8_ffn, "fp8_linear_gelu")):  # ffn_in: the fused one
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, original=original, **k: calls.append(a[1].shape)
                            or original(*a, **k))
    batch = mlm_batch()
    ref, low = _model(), _model(Fp8Recipe(scaling))
    for _ in range(2):  # the second step scales from the first one's history under delayed
        out_ref, out = ref(**batch), low(**batch)
        out_ref.loss.backward()
        out.loss.backward()
    assert len(calls) == 2 * 4 * 2 and len(set(calls)) == 4  # each of the four weights' shapes
    assert abs(out.loss.item() - out_ref.loss.item()) < 0.01 * out_ref.loss.item()
    w_ref, w = ref.bert.layers[0].ffn_in.weight.grad, low.bert.layers[0].ffn_in.weight.grad
    assert ((w - w_ref).norm() / w_ref.norm()).item() < 0.1


def test_activation_checkpointing_recomputes_the_same_fp8_forward():
    batch = mlm_batch()
    grads = []
    for checkpointing in (False, True):
        model = _model(Fp8Recipe("delayed"))
        model.bert.gradient_checkpointing = checkpointing
        for _ in range(2):
            model.zero_grad()
            model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        grads.append([s.clone() for s in model.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[2]))
    assert all(torch.equal(a, b) for a, b in zip(grads[1], grads[3]))


def test_an_inf_weight_gives_a_non_finite_loss_as_the_loop_expects():
    """A diverged update leaves inf in a weight: a plain e4m3 cast would saturate it to 448 and the
    loss would stay finite, hiding the divergence from the loop's non-finite check."""
    model = _model(Fp8Recipe("delayed"))
    with torch.no_grad():
        model.bert.layers[0].ffn_in.weight[3, 5] = float("inf")
    out = model(**mlm_batch())
    assert not torch.isfinite(out.loss)
    out.loss.backward()
    model(**mlm_batch())  # the next forward rolls the step's amaxes in: the bad one stays out
    assert all(torch.isfinite(s.amax_history).all() for s in fp8.states_of(model))


def test_nan_input_gives_a_nan_loss():
    model = _model(Fp8Recipe("current"))
    with torch.no_grad():
        model.bert.embeddings.word.weight[7] = float("nan")
    batch = mlm_batch()
    batch["input_ids"][0, 3] = 7
    assert torch.isnan(model(**batch).loss)


def test_linear_without_fp8_is_f_linear_and_bad_arguments_are_named():
    x, w, _ = _data(8, 32, 16)
    b = torch.randn(16)
    assert torch.equal(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    state = Fp8State(Fp8Recipe())
    y = ops.linear(x, w, b, fp8=state)
    assert torch.equal(y, fp8.fp8_linear(x, w, state) + b)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.linear(x, w[:, :16], fp8=state)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.linear(x, w, b[:8], fp8=state)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.linear(x.double(), w, fp8=state)
    with pytest.raises(TypeError, match="fp8 must be"):
        ops.linear(x, w, fp8="e4m3")


def test_scaled_mm_pads_dimensions_that_are_not_multiples_of_16(monkeypatch):
    """CUDA's _scaled_mm wants every dimension a multiple of 16: zero padding, sliced off after."""
    seen = []
    original = torch._scaled_mm

    def spy(a, b, *args, **kwargs):
        seen.append((tuple(a.shape), tuple(b.shape), b.stride()))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    monkeypatch.setattr(fp8, "_pads", lambda device: True)
    x, w, _ = _data(5, 9, 11)
    s = torch.tensor(1.0)
    qx, qw = fp8.quantize(x, E4M3, s), fp8.quantize(w, E4M3, s)
    got = fp8.scaled_mm(qx, qw, s, s, torch.float32, emulate=False)
    assert seen == [((16, 16), (16, 16), (1, 16))]  # the second operand column-major
    assert got.shape == (5, 11)
    assert torch.allclose(got, qx.float() @ qw.float().t(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_fast_accumulation_reaches_the_forward_gemms_only(fast, monkeypatch):
    """precision.fp8_fast_accum: `_scaled_mm(use_fast_accum=)` of both forward GEMM kinds (the
    plain FP8 linear and the FFN's fused one) follows it; the four gradient GEMMs keep exact sums."""
    seen = []
    original = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: seen.append(k["use_fast_accum"]) or original(*a, **k))
    recipe = Fp8Recipe("delayed", fast_accum=fast)
    states = [Fp8State(recipe) for _ in range(2)]
    x = torch.randn(5, 32, requires_grad=True)
    w1, b1, w2 = (torch.randn(64, 32) * 0.1).requires_grad_(), torch.zeros(64, requires_grad=True), \
        (torch.randn(32, 64) * 0.1).requires_grad_()
    inner = fp8_ffn.fp8_linear_gelu(x, w1, b1, states[0], states[1], emulate=False)
    out = fp8.fp8_linear(inner.anchor, w2, states[1], emulate=False, given=inner.cast)
    assert seen == [fast, fast]
    out.sum().backward()
    assert seen[2:] == [False] * 4 and x.grad is not None and w1.grad is not None


def test_recipe_and_config_errors_name_the_key():
    config = load_config("configs/tiny-cpu.yaml")
    p = config.precision
    assert (p.fp8, p.fp8_scaling, p.fp8_grad_format, p.fp8_amax_history, p.fp8_fast_accum) == \
        (False, "current", "e5m2", 16, False)
    assert Fp8Recipe.from_config(load_config(None, ["precision.fp8_scaling=delayed"])).scaling == "delayed"
    assert Fp8Recipe.from_config(load_config(None, ["precision.fp8_fast_accum=true"])).fast_accum is True
    for override, key in (("precision.fp8=2", "precision.fp8"), ("precision.fp8_scaling=late", "precision.fp8_scaling"),
                          ("precision.fp8_grad_format=e3m4", "precision.fp8_grad_format"),
                          ("precision.fp8_amax_history=0", "precision.fp8_amax_history"),
                          ("precision.fp8_fast_accum=often", "precision.fp8_fast_accum")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            load_config(None, [override])
        assert err.value.key == key
    from bert_fast.train.compiled import check_compile

    check_compile(load_config(None, ["precision.fp8=true", "train.compile=true"]), torch.device("cpu"))
    # FP8 graphs (tests/test_fp8_graphs.py); fp16's loss scaler still reads the loss every step.
    check_compile(load_config(None, ["precision.fp8=true", "train.cuda_graphs=true"]), torch.device("cuda"))
    with pytest.raises(ValueError, match="train.cuda_graphs: precision.fp16's loss scaler"):
        check_compile(load_config(None, ["precision.fp8=true", "precision.bf16=false", "precision.fp16=true",
                                         "train.cuda_graphs=true"]), torch.device("cuda"))


def test_devices_without_fp8_are_refused_naming_the_key(monkeypatch):
    monkeypatch.delenv(fp8.EMULATE_ENV, raising=False)
    with pytest.raises(ValueError, match=r"precision.fp8 needs a CUDA GPU .*BERT_FAST_FP8_EMULATE=1"):
        fp8.check_device(torch.device("cpu"))
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    fp8.check_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"precision.fp8 needs FP8 tensor cores .*A100 is 8.0"):
        fp8.check_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_device(torch.device("cuda", 0))


def test_resume_needs_the_same_fp8_scaling_state(tmp_path):
    from bert_fast.train.checkpoint_manifest import CheckpointError
    from bert_fast.train.preflight import check_start

    config = BertConfig.from_preset("tiny", vocab_size=500)
    delayed = load_config(None, ["precision.fp8=true", "precision.fp8_scaling=delayed"])
    meta = {"step": 40, "client_state": {"model_config": config.to_dict(), "global_batch": 64,
                                         "config": delayed.to_dict()}}
    check_start("resume", tmp_path, meta, config, 100, 64, delayed.precision)
    check_start("init_from", tmp_path, meta, config, 100, 64, load_config(None).precision)  # weights only
    for other, says in ((load_config(None), "this run has no FP8 scaling state"),
                        (load_config(None, ["precision.fp8=true"]), "this run has no FP8 scaling state"),
                        (load_config(None, ["precision.fp8=true", "precision.fp8_scaling=delayed",
                                            "precision.fp8_amax_history=8"]), "this run has .*fp8_amax_history=8")):
        with pytest.raises(CheckpointError, match=f"saved with precision.fp8_scaling=delayed, "
                                                  f"precision.fp8_amax_history=16, {says}"):
            check_start("resume", tmp_path, meta, config, 100, 64, other.precision)
    meta["client_state"]["config"] = load_config(None, ["precision.fp8=true"]).to_dict()  # current: no state
    check_start("resume", tmp_path, meta, config, 100, 64, load_config(None).precision)


def test_weights_only_loads_leave_fp8_state_fresh_and_stay_strict_otherwise():
    """init_from and exports take a checkpoint's weights (checkpoint_load.model_state_dict drops FP8
    state): into a model with FP8 state they load, the state left as it was; anything else missing
    or unexpected is still an error."""
    from bert_fast.train.checkpoint_load import _load_module_weights

    source = _model(Fp8Recipe("delayed"), seed=1)
    weights = {k: v for k, v in source.state_dict().items() if not fp8.is_state_key(k)}
    target = _model(Fp8Recipe("delayed"), seed=2)
    _load_module_weights(target, weights)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in weights.items())
    _load_module_weights(_model(), weights)  # a run without FP8
    with pytest.raises(RuntimeError, match=r"missing keys \['mlm_bias'\]"):
        _load_module_weights(target, {k: v for k, v in weights.items() if k != "mlm_bias"})
    with pytest.raises(RuntimeError, match="unexpected keys"):
        _load_module_weights(_model(), source.state_dict())  # state where the model has none
