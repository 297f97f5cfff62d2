"""kernels/embeddings.py under the Triton interpreter: output and the five gradients (word,
position, token type, gamma, beta) against float64, compared three ways; padding_idx, dropout with
the exposed mask, determinism, bad input and sm_90 compilation without spills."""

import pytest
import torch

from bert_fast import ops
from bert_fast.kernels import aot
from bert_fast.kernels.embeddings import (
    _embeddings_bwd_kernel,
    _embeddings_fwd_kernel,
    embeddings,
    embeddings_reference,
)
from bert_fast.kernels.layernorm import block_config, dropout_mask

AOT_MISSING = aot.unavailable_reason()
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


@pytest.mark.slow
@pytest.mark.skipif(AOT_MISSING is not None, reason=f"cannot compile for sm_90: {AOT_MISSING}")
def test_compiles_for_sm90_without_spills():
    specs = []
    for hidden, dtype, has_dropout, ids in ((768, "bf16", True, "i64"), (768, "fp32", False, "i32"),
                                            (128, "bf16", True, "i64"), (4096, "bf16", True, "i64")):
        block, warps = block_config(hidden)
        ptr = f"*{dtype}"
        common = dict(InputIds=f"*{ids}", TokenTypeIds=f"*{ids}", PositionIds=f"*{ids}", Word=ptr,
                      TokenType=ptr, Position=ptr, W=ptr, Mean="*fp32", Rstd="*fp32", stride_word_row="i64",
                      stride_type_row="i64", stride_pos_row="i64", N="i32", dropout_p="fp32", Seed="*i64")
        fwd = dict(common, B=ptr, Y=ptr, stride_y_row="i64", eps="fp32")
        bwd = dict(common, DY=ptr, DH=ptr, DW="*fp32", DB="*fp32", stride_dy_row="i64", stride_dh_row="i64",
                   M="i32", rows_per_program="i32")
        constexprs = dict(HAS_DROPOUT=has_dropout, BLOCK_N=block)
        specs += [aot.AotSpec(_embeddings_fwd_kernel, fwd, constexprs, num_warps=warps),
                  aot.AotSpec(_embeddings_bwd_kernel, bwd, constexprs, num_warps=warps)]
    reports = aot.compile_reports(specs, arch=90)
    table = "\n".join(f"{s.signature['Word'][1:]} ids {s.signature['InputIds'][1:]} {r.row()}"
                      for s, r in zip(specs, reports))
    print(table)
    assert all(r.spills == 0 for r in reports), table
