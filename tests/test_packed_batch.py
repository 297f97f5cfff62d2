"""The packed batch the training loader builds: BertForPreTraining gives it the same losses and
gradients as the padded batch it came from (both backends, filler rows and an empty slot), a
training step on it reads nothing back from the device, and its checks name the bad argument."""

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.ops import padding
from bert_fast.optim import FusedLAMB
from helpers import count_launches_and_syncs, packed_from_padded, padded_batch

LENGTHS = [16, 7, 11, 1]


def model(backend: str, seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    config = BertConfig.from_preset("tiny", vocab_size=97, max_position_embeddings=32, backend=backend,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForPreTraining(config).train()


@pytest.mark.parametrize("backend", ["torch", "fast"])
def test_packed_batch_gives_the_padded_losses_and_gradients(backend):
    padded = padded_batch(model(backend).config, LENGTHS, 16, seed=3)
    # 40 filler rows: more than max_seqlen, so the fast path cuts them into three pieces.
    packed = packed_from_padded(padded, filler=40, empty_slots=2)
    a, b = model(backend), model(backend)
    out_a, out_b = a(**padded), b(**packed)
    for name in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "mlm_predictions"):
        torch.testing.assert_close(out_b[name], out_a[name], rtol=1e-5, atol=1e-6, msg=name)
    out_a.loss.backward()
    out_b.loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", "fast"])
def test_a_training_step_on_a_packed_batch_reads_nothing_back(backend):
    net = model(backend)
    net.config.hidden_dropout_prob = net.config.attention_probs_dropout_prob = 0.1
    packed = packed_from_padded(padded_batch(net.config, LENGTHS, 16, seed=4), filler=5, empty_slots=1)
    optimizer = FusedLAMB(net.parameters(), lr=1e-3)
    with count_launches_and_syncs() as counts:
        out = net(**packed, validate=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert counts["syncs"] == 0, counts
    assert torch.isfinite(out.loss)  # read after counting
    with count_launches_and_syncs() as counts:
        net(**packed)  # validate=True: the values, with one device->host copy
    # (and on the CPU the fused MLM loss reads its labels too; on CUDA it never does)
    assert counts["syncs"] == (1 if backend == "torch" else 2), counts


def test_filler_rows_become_sequences_of_their_own_no_longer_than_max_seqlen():
    cu = torch.tensor([0, 5, 5, 9], dtype=torch.int32)
    full = padding.filler_segments(cu, 30, 8)
    assert full.tolist() == [0, 5, 5, 9, 17, 25, 30, 30]
    layout = padding.packed_layout(full, 30, 8)
    expected = [0 * 8 + p for p in range(5)] + [2 * 8 + p for p in range(4)]
    expected += [3 * 8 + p for p in range(8)] + [4 * 8 + p for p in range(8)] + [5 * 8 + p for p in range(5)]
    assert layout.indices.tolist() == expected
    # Without the filler cut: filler rows all go to the one slot past the padded batch.
    assert padding.packed_layout(cu, 12, 8).indices.tolist()[9:] == [3 * 8] * 3


@pytest.mark.parametrize("change, error, match", [
    (dict(input_ids=torch.tensor([[1, 2]])), ValueError, "input_ids must have 1 dimension"),
    (dict(cu_seqlens=torch.tensor([0, 3], dtype=torch.int64)), TypeError, "cu_seqlens must have dtype"),
    (dict(max_seqlen=1000), ValueError, "max_seqlen must be an int in"),
    (dict(mlm_positions=None), ValueError, "mlm_positions and mlm_labels come together"),
    (dict(next_sentence_label=torch.tensor([0])), ValueError, "next_sentence_label must have shape"),
    (dict(input_ids=torch.tensor([1, 200, 3, 4, 0, 0])), ValueError, "input_ids contains 200"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError, "sequence lengths"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, r"cu_seqlens\[-1\] contains 7"),
    (dict(mlm_positions=torch.tensor([5, 3])), ValueError, "filler row"),
    (dict(mlm_labels=torch.tensor([97, -100])), ValueError, "mlm_labels contains 97"),
])
def test_bad_packed_batches_name_the_argument(change, error, match):
    batch = dict(input_ids=torch.tensor([1, 2, 3, 4, 0, 0]), token_type_ids=torch.zeros(6, dtype=torch.long),
                 cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32), max_seqlen=16,
                 mlm_positions=torch.tensor([1, 3]), mlm_labels=torch.tensor([5, -100]),
                 next_sentence_label=torch.tensor([0, -100]))
    batch.update(change)
    if "mlm_positions" in change and change["mlm_positions"] is None:
        batch["mlm_labels"] = torch.tensor([5, -100])
    with pytest.raises(error, match=match):
        model("torch")(**batch)
