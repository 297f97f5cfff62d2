"""kernels/embeddings.py under the Triton interpreter: output and the five gradients (word,
position, token type, gamma, beta) against float64, compared three ways; padding_idx, dropout with
the exposed mask, determinism, bad input, launches and host syncs per call (the sm_90 builds are
checked by tests/test_row_norm_aot.py)."""

import early
import pytest
import torch

from bert_fast import ops
from bert_fast.kernels import embeddings as embeddings_module
from bert_fast.kernels.embeddings import embeddings, embeddings_reference
from bert_fast.kernels.layernorm import dropout_mask
from helpers import count_launches_and_syncs, trace_with_fake_tensors

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}
TABLES = ("word", "position", "token_type", "norm_weight", "norm_bias")


def make_inputs(batch, seq, hidden, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    ids[0, -1] = 0  # the padding id appears
    tables = dict(word=torch.randn(vocab, hidden, generator=g), position=torch.randn(seq + 3, hidden, generator=g),
                  token_type=torch.randn(2, hidden, generator=g) + 2,
                  norm_weight=torch.randn(hidden, generator=g), norm_bias=torch.randn(hidden, generator=g))
    idx = dict(input_ids=ids, token_type_ids=torch.randint(0, 2, (batch, seq), generator=g),
               position_ids=torch.arange(seq).expand(batch, seq))
    return idx, tables


def run(fn, idx, tables, dtype, grad, **kwargs):
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in tables.items()}
    y = fn(**idx, **leaves, **kwargs)
    y.backward(grad.to(dtype))
    return {"y": y.detach(), **{k: v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, seq, hidden, dropout_p", [
    (1, 1, 1, 0.0), (3, 7, 33, 0.0), (4, 9, 128, 0.0), (1, 1, 5, 0.2), (2, 5, 33, 0.2),
])
def test_matches_float64(batch, seq, hidden, dropout_p, dtype):
    idx, tables = make_inputs(batch, seq, hidden)
    rows = batch * seq
    keep = dropout_mask(torch.tensor([11]), rows, hidden, dropout_p).view(batch, seq, hidden) if dropout_p else None
    grad = torch.randn(batch, seq, hidden)
    kwargs = dict(eps=1e-5, padding_idx=0, dropout_p=dropout_p)
    exact = run(embeddings_reference, idx, {k: v.to(dtype) for k, v in tables.items()}, torch.float64, grad,
                keep=keep, **kwargs)
    eager = run(embeddings_reference, idx, tables, dtype, grad, keep=keep, **kwargs)
    ours = run(embeddings, idx, tables, dtype, grad, seed=torch.tensor([11]), **kwargs)
    report = []
    for name in exact:
        assert ours[name].dtype == dtype and ours[name].shape == exact[name].shape, name
        e_ours = (ours[name].double() - exact[name]).abs().max().item()
        e_eager = (eager[name].double() - exact[name]).abs().max().item()
        # Table and weight gradients sum over tokens: their tolerance scales with their size.
        atol = ATOL[dtype] * (max(exact[name].abs().max().item(), 1.0) if name != "y" else 1.0)
        report.append((name, e_ours, e_eager, e_ours <= 2 * e_eager + atol))
    table = "\n".join(f"{n:>11}: ours {a:.3e}  eager {b:.3e}  {'ok' if ok else 'FAIL'}" for n, a, b, ok in report)
    assert all(ok for *_, ok in report), f"{dtype} dropout={dropout_p}\n{table}"
    assert not ours["word"][0].any(), "the padding row must get no gradient"


def test_ops_fast_matches_torch_and_no_padding_idx():
    idx, tables = make_inputs(2, 6, 40, seed=3)
    for padding_idx in (None, 0, 5):
        args = [idx["input_ids"], idx["token_type_ids"], idx["position_ids"], *tables.values(), 1e-12]
        grad = torch.randn(2, 6, 40)
        results = []
        for backend in ("torch", "fast"):
            leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a
                      for a in args[:-1]]
            y = ops.embeddings(*leaves, args[-1], padding_idx=padding_idx, backend=backend)
            y.backward(grad)
            results.append([y, *(t.grad for t in leaves[3:])])
        for name, a, b in zip(("y", *TABLES), *results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"{name} padding_idx={padding_idx}")


def test_dropout_after_layer_norm_uses_the_mask():
    idx, tables = make_inputs(2, 4, 24)
    y = embeddings(**idx, **tables, dropout_p=0.4, seed=torch.tensor([8]))
    keep = dropout_mask(torch.tensor([8]), 8, 24, 0.4).view(2, 4, 24)
    assert torch.equal(y == 0, ~keep)
    torch.testing.assert_close(y, embeddings_reference(**idx, **tables, dropout_p=0.4, keep=keep))


def test_deterministic_and_inputs_unchanged():
    idx, tables = make_inputs(3, 8, 32, vocab=5)  # few ids: many tokens share a word row
    tables = {k: v.requires_grad_() for k, v in tables.items()}
    before = {k: v.detach().clone() for k, v in {**idx, **tables}.items()}
    grads = []
    for _ in range(2):
        y = embeddings(**idx, **tables, dropout_p=0.1, seed=torch.tensor([4]))
        grads.append(torch.autograd.grad(y, list(tables.values()), torch.ones_like(y)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    for k, v in {**idx, **tables}.items():
        assert torch.equal(v, before[k]), k


def test_int32_ids_and_no_tokens():
    idx, tables = make_inputs(2, 3, 16)
    expected = embeddings_reference(**idx, **tables)
    idx32 = {k: v.int() for k, v in idx.items()}
    torch.testing.assert_close(embeddings(**idx32, **tables), expected)
    empty = {k: v[:0] for k, v in idx.items()}
    assert embeddings(**empty, **tables).shape == (0, 3, 16)


@pytest.mark.parametrize("change, error, match", [
    (dict(input_ids=torch.ones(2, 3)), TypeError, "input_ids must have dtype"),
    (dict(token_type_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"token_type_ids must have shape \(2, 3\)"),
    (dict(word=torch.randn(10, 8, dtype=torch.float64)), TypeError, "word must have dtype"),
    (dict(position=torch.randn(5, 7)), ValueError, r"position must have shape \(\*, 8\)"),
    (dict(token_type=torch.randn(2, 8).half()), TypeError, "token_type has dtype torch.float16"),
    (dict(norm_weight=torch.ones(9)), ValueError, r"norm_weight must have shape \(8,\)"),
    (dict(input_ids=torch.full((2, 3), 10)), ValueError, r"input_ids contains 10; allowed values are \[0, 9\]"),
    (dict(input_ids=torch.full((2, 3), -1)), ValueError, "input_ids contains -1"),
    (dict(token_type_ids=torch.full((2, 3), 2)), ValueError, "token_type_ids contains 2"),
    (dict(position_ids=torch.full((2, 3), 5)), ValueError, "position_ids contains 5"),
    (dict(padding_idx=10), ValueError, "padding_idx must be None or an int"),
    (dict(eps=-1.0), ValueError, "eps must be a positive float"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be a float"),
])
def test_bad_input(change, error, match):
    args = dict(input_ids=torch.zeros(2, 3, dtype=torch.long), token_type_ids=torch.zeros(2, 3, dtype=torch.long),
                position_ids=torch.zeros(2, 3, dtype=torch.long), word=torch.randn(10, 8), position=torch.randn(5, 8),
                token_type=torch.randn(2, 8), norm_weight=torch.ones(8), norm_bias=torch.zeros(8), eps=1e-5)
    with pytest.raises(error, match=match):
        embeddings(**{**args, **change})


def test_no_host_sync_without_the_id_check_and_few_launches():
    idx, tables = make_inputs(2, 6, 40, seed=3)
    leaves = {k: v.requires_grad_() for k, v in tables.items()}
    with count_launches_and_syncs(embeddings_module) as counts:
        y = embeddings(**idx, **leaves, dropout_p=0.1, seed=torch.tensor([2]), check_ids=False)
    assert counts == {"launches": 1, "syncs": 0}, counts
    with count_launches_and_syncs(embeddings_module) as counts:
        y.backward(torch.ones_like(y))
    # The row kernel, the finalize, and a segment-sum kernel and its join for the word table and
    # for the (position, type) pairs: no sync, where embedding_dense_backward has one per table.
    assert counts == {"launches": 6, "syncs": 0}, counts
    with count_launches_and_syncs(embeddings_module) as counts:
        embeddings(**idx, **tables)
    assert counts["syncs"] == 1  # the id check, when asked for: one copy for all three id tensors


_TRACE = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from bert_fast.kernels.embeddings import embeddings

def step(ids, types, positions, seed, *tables):
    y = embeddings(ids, types, positions, *tables, 1e-12, padding_idx=0, dropout_p=0.1, seed=seed,
                   check_ids=False)
    return y, torch.autograd.grad(y.float().square().sum(), tables)

ids = torch.randint(0, 30, (2, 5))
tables = [torch.randn(n, 768, dtype=torch.bfloat16, requires_grad=True) for n in (30, 8, 2)]
tables += [torch.randn(768, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
gm = make_fx(step, tracing_mode="fake")(ids, torch.zeros_like(ids), torch.arange(5).expand(2, 5),
                                        torch.tensor([3]), *tables)
print(gm.code)
"""


@early.job
def embeddings_fake_trace(folder, threads):
    """trace_with_fake_tensors(_TRACE) (a fresh process, the interpreter off): an early job (tests/early.py)."""
    return trace_with_fake_tensors(_TRACE)


def test_ops_trace_with_fake_tensors(embeddings_fake_trace):
    code = embeddings_fake_trace
    assert code.count("bert_fast.embeddings_fwd") == 1
    assert code.count("bert_fast.embeddings_bwd") == 1
    assert "nonzero" not in code and "_local_scalar_dense" not in code


def test_registered_op_schema_and_autograd():
    # The fake-tensor and AOT-dispatch checks need a compiled kernel: tests/gpu runs them.
    idx, tables = make_inputs(2, 5, 64)
    tables = {name: t.requires_grad_() for name, t in tables.items()}
    args = (idx["input_ids"].flatten(), idx["token_type_ids"].flatten(), idx["position_ids"].flatten(),
            *tables.values(), torch.tensor([3]), 1e-12, 0, 0.1, 0)
    for utils in ("test_schema", "test_autograd_registration"):
        torch.library.opcheck(torch.ops.bert_fast.embeddings_fwd.default, args, test_utils=utils)
