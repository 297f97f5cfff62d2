"""kernels/segment_sum.py under the Triton interpreter: sorted segment sums against a float64
index_add, with segments inside one block, across block boundaries and across more blocks than one
join step covers, the skipped (padding) row, rows no id names, bitwise determinism and empty input."""

import pytest
import torch

from bert_fast.kernels.segment_sum import BLOCK_T, segment_sum


def reference(values, ids, num_rows, skip_id=-1):
    out = torch.zeros(num_rows, values.shape[1], dtype=torch.float64)
    out.index_add_(0, ids.long(), values.double())
    if skip_id >= 0:
        out[skip_id] = 0
    return out


@pytest.mark.parametrize("tokens, num_rows, cols", [
    (1, 3, 8), (BLOCK_T, 5, 16), (5 * BLOCK_T + 7, 40, 100), (300, 1000, 64),
])
def test_matches_float64_index_add(tokens, num_rows, cols):
    g = torch.Generator().manual_seed(tokens)
    values = torch.randn(tokens, cols, generator=g)
    ids = torch.randint(0, num_rows, (tokens,), generator=g)
    out = segment_sum(values, ids, num_rows)
    expected = reference(values, ids, num_rows)
    assert out.dtype == values.dtype and out.shape == (num_rows, cols)
    # float32 sums of up to `tokens` terms: n * 2^-24 of the magnitudes, as a float32 index_add errs.
    bound = tokens * 2**-24 * values.abs().max().item() * 4
    assert (out.double() - expected).abs().max().item() <= bound
    never = torch.ones(num_rows, dtype=torch.bool)
    never[ids] = False
    assert not out[never].any()


def test_a_segment_longer_than_one_join_step():
    # 40 blocks of one id: the join adds the partials of more blocks than one step (JOIN = 32).
    tokens = 40 * BLOCK_T + 5
    values = torch.randn(tokens, 4, generator=torch.Generator().manual_seed(1))
    ids = torch.full((tokens,), 2)
    ids[:3] = 0
    ids[-2:] = 3
    out = segment_sum(values, ids, 4)
    torch.testing.assert_close(out.double(), reference(values, ids, 4), rtol=1e-5, atol=1e-4)


def test_skip_id_float32_output_and_determinism():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(500, 24, generator=g).half()
    ids = torch.randint(0, 7, (500,), generator=g)
    out = segment_sum(values, ids, 7, skip_id=0, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and not out[0].any()
    torch.testing.assert_close(out.double(), reference(values, ids, 7, skip_id=0), rtol=1e-6, atol=1e-4)
    assert torch.equal(out, segment_sum(values, ids, 7, skip_id=0, out_dtype=torch.float32))


def test_no_tokens():
    out = segment_sum(torch.empty(0, 8), torch.empty(0, dtype=torch.long), 5)
    assert out.shape == (5, 8) and not out.any()
