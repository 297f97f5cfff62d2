"""kernels/layernorm.py under the Triton interpreter: output and every gradient against float64
(compared three ways: ours and same-dtype eager both against float64), dropout masks, bad input,
launches and host syncs per call, and the encoder's fast path against its torch path (the sm_90
builds are checked by tests/test_row_norm_aot.py)."""

import early
import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.kernels import layernorm
from bert_fast.kernels.layernorm import MAX_HIDDEN, add_layer_norm, add_layer_norm_reference, dropout_mask
from helpers import count_launches_and_syncs, padded_batch, trace_with_fake_tensors

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def seed_tensor(value):
    return torch.tensor([value])


def make_inputs(shape, seed=0):
    """float32 inputs; residual offset so the mean is far from 0 (a one-pass variance would lose
    digits there)."""
    g = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    return dict(x=torch.randn(shape, generator=g) * 2, residual=torch.randn(shape, generator=g) + 4,
                weight=torch.randn(hidden, generator=g), bias=torch.randn(hidden, generator=g),
                x_bias=torch.randn(hidden, generator=g))


def run(fn, inputs, dtype, grad, **kwargs):
    """fn on copies of inputs in dtype; returns {name: output or gradient} (None entries skipped)."""
    leaves = {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, **kwargs)
    y.backward(grad.to(dtype))
    return {"y": y.detach(), **{k: v.grad for k, v in leaves.items() if v is not None}}


def check_three_way(inputs, dtype, eps=1e-5, dropout_p=0.0, seed_value=1234):
    """Ours (dtype) and eager (dtype), each against float64, with the kernel's own dropout mask."""
    shape = inputs["x"].shape
    rows = inputs["x"].numel() // shape[-1] if shape[-1] else 0
    keep = dropout_mask(seed_tensor(seed_value), rows, shape[-1], dropout_p).view(shape) if dropout_p else None
    grad = torch.randn(shape)
    exact_in = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    exact = run(add_layer_norm_reference, exact_in, torch.float64, grad, eps=eps, dropout_p=dropout_p,
                keep=keep)
    eager = run(add_layer_norm_reference, inputs, dtype, grad, eps=eps, dropout_p=dropout_p, keep=keep)
    ours = run(add_layer_norm, inputs, dtype, grad, eps=eps, dropout_p=dropout_p, seed=seed_tensor(seed_value))
    assert ours.keys() == exact.keys()
    report = []
    for name in exact:
        assert ours[name].dtype == dtype and ours[name].shape == exact[name].shape, name
        e_ours = (ours[name].double() - exact[name]).abs().max().item() if exact[name].numel() else 0.0
        e_eager = (eager[name].double() - exact[name]).abs().max().item() if exact[name].numel() else 0.0
        # Weight gradients sum over rows: their tolerance scales with their size.
        scale = exact[name].abs().max().item() if name in ("weight", "bias", "x_bias") else 1.0
        atol = ATOL[dtype] * max(scale, 1.0)
        report.append((name, e_ours, e_eager, e_ours <= 2 * e_eager + atol))
    table = "\n".join(f"{n:>9}: ours {a:.3e}  eager {b:.3e}  {'ok' if ok else 'FAIL'}" for n, a, b, ok in report)
    assert all(ok for *_, ok in report), f"{dtype} dropout={dropout_p} shape={tuple(shape)}\n{table}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, dropout_p", [
    ((1, 1), 0.0), ((3, 7), 0.0), ((37, 100), 0.0), ((2, 5, 129), 0.0),
    ((1, 1), 0.3), ((3, 7), 0.3), ((2, 5, 129), 0.3),  # the interpreter's Philox is slow: fewer rows
])
def test_matches_float64(shape, dtype, dropout_p):
    check_three_way(make_inputs(shape), dtype, dropout_p=dropout_p)


@pytest.mark.parametrize("drop", [("x_bias",), ("residual",), ("x_bias", "residual")])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_optional_inputs(drop, dropout_p):
    inputs = make_inputs((11, 48), seed=1)
    for name in drop:
        inputs[name] = None
    check_three_way(inputs, torch.float32, dropout_p=dropout_p)


@pytest.mark.parametrize("hidden", [768, 1024, 640])
def test_bert_eps_and_hidden(hidden):
    """BERT's eps=1e-12 at hidden 768 (3 chunks of 256) and 1024 (2 of 512); 640 (5 of 128)."""
    check_three_way(make_inputs((5, hidden), seed=2), torch.float32, eps=1e-12, dropout_p=0.1)


def test_no_rows():
    inputs = {k: v.requires_grad_() for k, v in make_inputs((0, 16)).items()}
    y = add_layer_norm(**inputs, dropout_p=0.1)
    y.sum().backward()
    assert y.shape == (0, 16)
    assert all(v.grad is not None and not v.grad.any() for v in inputs.values())


def test_strided_and_non_contiguous_inputs():
    inputs = make_inputs((9, 40))
    wide = torch.randn(9, 100)
    wide[:, 30:70] = inputs["x"]
    expected = add_layer_norm_reference(**inputs, eps=1e-5)
    # Rows with a stride (a view), and a transposed tensor (copied to unit stride).
    torch.testing.assert_close(add_layer_norm(**{**inputs, "x": wide[:, 30:70]}, eps=1e-5), expected)
    transposed = inputs["residual"].t().contiguous().t()
    torch.testing.assert_close(add_layer_norm(**{**inputs, "residual": transposed}, eps=1e-5), expected)


def test_inputs_not_modified_and_backward_deterministic():
    inputs = {k: v.requires_grad_() for k, v in make_inputs((9, 64)).items()}
    before = {k: v.detach().clone() for k, v in inputs.items()}
    grads = []
    for _ in range(2):
        y = add_layer_norm(**inputs, dropout_p=0.25, seed=seed_tensor(7))
        grads.append(torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y)))
    for k in inputs:
        assert torch.equal(inputs[k], before[k]), k
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_dropout_mask_statistics():
    rows, hidden = 16, 1000
    for p in (0.1, 0.5):
        keep = dropout_mask(seed_tensor(99), rows, hidden, p)
        kept, n = keep.float().mean().item(), rows * hidden
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(kept - (1 - p)) < 6 * sigma, (p, kept)
        # Every row draws its own numbers (the offset includes the row) and columns are not stuck.
        assert not (keep[1:] == keep[:1]).all(1).any()
        assert 0.5 * (1 - p) < keep.float().mean(0).mean().item() < 1.5 * (1 - p)
    assert torch.equal(dropout_mask(seed_tensor(5), 3, 17, 0.3), dropout_mask(seed_tensor(5), 3, 17, 0.3))
    assert not torch.equal(dropout_mask(seed_tensor(5), 8, 64, 0.3), dropout_mask(seed_tensor(6), 8, 64, 0.3))
    assert dropout_mask(seed_tensor(5), 8, 64, 0.0).all()


def test_dropout_applies_the_exposed_mask():
    """Dropped elements of x never reach the output: with x_bias only, setting dropped x entries
    to anything leaves y unchanged."""
    inputs = make_inputs((6, 33))
    keep = dropout_mask(seed_tensor(3), 6, 33, 0.5)
    y = add_layer_norm(**inputs, dropout_p=0.5, seed=seed_tensor(3))
    noisy = torch.where(keep, inputs["x"], torch.full_like(inputs["x"], 1e3))
    torch.testing.assert_close(add_layer_norm(**{**inputs, "x": noisy}, dropout_p=0.5, seed=seed_tensor(3)), y)


def test_seed_follows_torch_manual_seed():
    inputs = make_inputs((4, 32))
    torch.manual_seed(1)
    a = add_layer_norm(**inputs, dropout_p=0.5)
    torch.manual_seed(1)
    b = add_layer_norm(**inputs, dropout_p=0.5)
    c = add_layer_norm(**inputs, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("change, error, match", [
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(2, 8, dtype=torch.long)), TypeError, "x must have dtype"),
    (dict(x=torch.randn(2, 8, dtype=torch.float64)), TypeError, "x must have dtype"),
    (dict(weight=torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
    (dict(bias=torch.ones(1, 8)), ValueError, r"bias must have shape \(8,\)"),
    (dict(x_bias=torch.ones(9)), ValueError, r"x_bias must have shape \(8,\)"),
    (dict(residual=torch.randn(3, 8)), ValueError, r"residual must have shape \(2, 8\)"),
    (dict(residual=torch.randn(2, 8).half()), TypeError, "residual has dtype torch.float16"),
    (dict(weight=torch.ones(8, device="meta")), ValueError, "weight has device meta"),
    (dict(x=torch.randn(2, 0), weight=torch.ones(0), bias=torch.ones(0)), ValueError, "non-empty last dimension"),
    (dict(x=torch.randn(1, MAX_HIDDEN + 1), weight=torch.ones(MAX_HIDDEN + 1), bias=torch.ones(MAX_HIDDEN + 1)), ValueError, "at most"),
    (dict(eps=0.0), ValueError, "eps must be a positive float"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(seed=3), TypeError, "seed must be a torch.Tensor"),
    (dict(seed=torch.tensor([3], dtype=torch.int32)), TypeError, "seed must have dtype"),
    (dict(seed=torch.tensor([[3]])), ValueError, r"seed must have shape \(1,\)"),
    (dict(site=-1), ValueError, "site must be an int"),
])
def test_bad_input(change, error, match):
    args = {**dict(x=torch.randn(2, 8), weight=torch.ones(8), bias=torch.zeros(8), eps=1e-5), **change}
    with pytest.raises(error, match=match):
        add_layer_norm(**args)


def test_encoder_fast_matches_torch():
    """BertForPreTraining in training mode (dropout 0) through the Triton add+LayerNorm and
    embeddings against the torch path: losses, logits and every parameter gradient."""
    values = dict(vocab_size=97, hidden_size=64, num_attention_heads=2, intermediate_size=96,
                  max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch_model = BertForPreTraining(BertConfig.from_preset("tiny", **values, backend="torch")).train()
    fast_model = BertForPreTraining(BertConfig.from_preset("tiny", **values, backend="fast")).train()
    fast_model.load_state_dict(torch_model.state_dict())
    batch = padded_batch(torch_model.config, lengths=[9, 4], seq=9)
    a = torch_model(**batch, return_mlm_logits=True)
    b = fast_model(**batch, return_mlm_logits=True)
    for name in ("loss", "mlm_logits", "nsp_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5, msg=name)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(torch_model.named_parameters(), fast_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_one_launch_forward_two_backward_and_no_host_sync(dropout_p):
    inputs = {k: v.requires_grad_() for k, v in make_inputs((7, 96)).items()}
    seed = seed_tensor(5)
    with count_launches_and_syncs(layernorm) as counts:
        y = add_layer_norm(**inputs, dropout_p=dropout_p, seed=seed)
    assert counts == {"launches": 1, "syncs": 0}, counts
    with count_launches_and_syncs(layernorm) as counts:
        y.backward(torch.ones_like(y))
    assert counts == {"launches": 2, "syncs": 0}, counts  # the row kernel and the finalize


def test_evaluation_saves_nothing_for_a_backward():
    # Without gradients the forward writes y only: x-hat, mean and rstd are for the backward.
    inputs = make_inputs((7, 96))
    with torch.no_grad():
        y, xhat, mean, rstd = layernorm._forward(inputs["x"], inputs["weight"], inputs["bias"],
                                                 inputs["x_bias"], inputs["residual"], seed_tensor(1), 1e-5,
                                                 0.0, 0, save=False)
    assert xhat.numel() == 0 and mean.numel() == 0 and rstd.numel() == 0
    torch.testing.assert_close(y, add_layer_norm_reference(**inputs, eps=1e-5))


@pytest.mark.parametrize("plain", [True, False])
def test_a_plain_layer_norm_saves_the_mean_and_reads_x_again(plain):
    # h is x without x_bias, residual and dropout: x-hat would be one more [M, N] write for nothing.
    inputs = make_inputs((7, 96))
    if plain:
        inputs.update(x_bias=None, residual=None)
    y, xhat, mean, rstd = layernorm._forward(inputs["x"], inputs["weight"], inputs["bias"], inputs["x_bias"],
                                             inputs["residual"], seed_tensor(1), 1e-5, 0.0, 0, save=True)
    h = inputs["x"] if plain else inputs["x"] + inputs["x_bias"] + inputs["residual"]
    expected_mean = h.double().mean(-1)
    expected_rstd = (h.double().var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-5, atol=0)
    if plain:
        assert xhat.numel() == 0
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    else:
        assert mean.numel() == 0
        torch.testing.assert_close(xhat.double(), (h.double() - expected_mean[:, None]) * expected_rstd[:, None],
                                   rtol=1e-5, atol=1e-5)


def test_no_rows_plain():
    inputs = {k: v.requires_grad_() for k, v in make_inputs((0, 16)).items() if k in ("x", "weight", "bias")}
    y = add_layer_norm(**inputs)
    y.sum().backward()
    assert y.shape == (0, 16)
    assert all(v.grad is not None and not v.grad.any() for v in inputs.values())


_TRACE = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from bert_fast.kernels.layernorm import add_layer_norm

def step(x, residual, weight, bias, x_bias, seed):
    y = add_layer_norm(x, weight, bias, 1e-12, x_bias=x_bias, residual=residual, dropout_p=0.1,
                       seed=seed, site=3)
    y = add_layer_norm(y, weight, bias, 1e-12)  # plain: saves the mean, reads its input again
    return y, torch.autograd.grad(y.float().square().sum(), (x, residual, weight, bias, x_bias))

x, residual = (torch.randn(6, 768, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
weight, bias, x_bias = (torch.randn(768, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
print(make_fx(step, tracing_mode="fake")(x, residual, weight, bias, x_bias, torch.tensor([3])).code)
"""


@early.job
def layernorm_fake_trace(folder, threads):
    """trace_with_fake_tensors(_TRACE) (a fresh process, the interpreter off): an early job (tests/early.py)."""
    return trace_with_fake_tensors(_TRACE)


def test_ops_trace_with_fake_tensors(layernorm_fake_trace):
    code = layernorm_fake_trace
    assert code.count("bert_fast.add_layer_norm_fwd") == 2
    assert code.count("bert_fast.add_layer_norm_bwd") == 2


def test_registered_op_schema_and_autograd():
    # The fake-tensor and AOT-dispatch checks need a compiled kernel: tests/gpu runs them.
    t = {name: v.requires_grad_() for name, v in make_inputs((5, 64)).items()}
    args = (t["x"], t["weight"], t["bias"], t["x_bias"], t["residual"], seed_tensor(3), 1e-12, 0.1, 2)
    for utils in ("test_schema", "test_autograd_registration"):
        torch.library.opcheck(torch.ops.bert_fast.add_layer_norm_fwd.default, args, test_utils=utils)
