"""bert_fast/data/packing.py: token buckets (the choice against a brute force over every set of
row counts), plan lengths against the builder's own, the static packed batch against the padded
one it stands for, and a loader that keeps to its buckets over an epoch and a resume."""

import itertools

import numpy as np
import pytest
import torch
from data_fixtures import prepared_corpus, pretraining_dataset, same_batch, take, text_documents

from bert_fast.data import builder, packing
from bert_fast.data.dataset import PretrainingLoader, collate

pytestmark = pytest.mark.skipif(not builder.native_available(), reason="bert_fast._data is not built")


def filler(totals, buckets) -> int:
    b = np.asarray(buckets)
    return int((b[np.searchsorted(b, totals)] - np.asarray(totals)).sum())


def test_buckets_minimise_the_filler_over_every_choice():
    rng = np.random.default_rng(0)
    for _ in range(150):
        max_total = int(rng.integers(16, 400))
        totals = rng.integers(1, max_total + 1, int(rng.integers(1, 25)))
        count = int(rng.integers(1, 5))
        got = packing.choose_buckets(totals, max_total, count)
        top = -(-max_total // 8) * 8
        assert len(got) <= count and got[-1] == top and list(got) == sorted(set(got))
        assert all(b % 8 == 0 for b in got)
        candidates = sorted({min(-(-int(t) // 8) * 8, top) for t in totals})
        best = min(filler(totals, sorted({*combo, top})) for r in range(count)
                   for combo in itertools.combinations(candidates, r))
        assert filler(totals, got) == best


def test_batch_totals_follow_the_order():
    lengths = np.array([5, 1, 7, 3, 2])
    assert packing.batch_totals(lengths, [4, 0, 2, 1, 3], 2).tolist() == [7, 8, 3]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("prepared"), text_documents(300, seed=5, sentences=(1, 9)),
                           shard_tokens=5000)


@pytest.mark.parametrize("objective", ["nsp", "sop", "none"])
def test_plan_lengths_are_the_built_lengths(prepared, objective):
    data = pretraining_dataset(prepared, 48, objective=objective)
    built = data.__getitems__(range(len(data)))["lengths"]
    assert np.array_equal(data.lengths(), built)


def test_static_batch_holds_the_padded_batch_real_tokens(prepared):
    data = pretraining_dataset(prepared, 48)
    settings = data.settings
    arrays = data.__getitems__(list(range(3, 17)))  # 14 samples in 16 slots: a last, partial batch
    collate_static = packing.StaticCollate(16, settings, (200, 400, 16 * 48))
    static, padded = collate_static(arrays), collate(arrays)
    real = padded["attention_mask"].bool()
    n, tokens = 14, int(real.sum())
    total = static["input_ids"].shape[0]
    assert total == min(b for b in (200, 400, 768) if b >= tokens) and static["tokens"] == tokens
    assert static["sequences"] == n and static["max_seqlen"] == 48
    assert torch.equal(static["input_ids"][:tokens], padded["input_ids"][real])
    assert torch.equal(static["token_type_ids"][:tokens], padded["token_type_ids"][real])
    assert (static["input_ids"][tokens:] == settings.pad_id).all() and not static["token_type_ids"][tokens:].any()
    cu = static["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.shape == (17,)
    assert torch.equal(cu[1:n + 1].long(), real.sum(1).cumsum(0)) and (cu[n + 1:] == tokens).all()
    predicted = static["mlm_labels"] != -100
    assert static["mlm_labels"].shape == (16 * settings.predictions,)
    assert torch.equal(static["mlm_labels"][predicted], padded["mlm_labels"][padded["mlm_labels"] != -100])
    flat = padded["input_ids"].new_full((tokens,), -100)
    flat[static["mlm_positions"][predicted]] = static["mlm_labels"][predicted]
    assert torch.equal(flat, padded["mlm_labels"][real]), "each label sits on its token's row"
    assert torch.equal(static["next_sentence_label"][:n], padded["next_sentence_label"])
    assert (static["next_sentence_label"][n:] == -100).all()


def test_static_batch_refuses_what_the_builder_should_never_give(prepared):
    data = pretraining_dataset(prepared, 48)
    settings = data.settings
    arrays = data.__getitems__([0, 1])
    arrays["input_ids"][1, 2] = settings.vocab_size
    with pytest.raises(ValueError, match="out-of-range input_ids"):
        packing.StaticCollate(2, settings, (96,))(arrays)
    with pytest.raises(ValueError, match="must hold a full batch"):
        packing.StaticCollate(4, settings, (96,))


def test_packed_loader_keeps_to_its_buckets_and_resumes(prepared):
    loader = PretrainingLoader(pretraining_dataset(prepared, 48), 8, seed=2, packed=True, buckets=4)
    settings = loader.dataset.settings
    buckets = tuple(int(b) for b in loader.collate.buckets)
    assert len(buckets) <= 4 and buckets[-1] == 8 * 48
    per_epoch = -(-len(loader.dataset) // 8)
    stream = iter(loader)
    seen = take(stream, 3)
    state = dict(loader.state_dict())
    seen += take(stream, per_epoch)  # across the epoch's end and its partial batch
    assert {b["input_ids"].shape[0] for b in seen} <= set(buckets)
    assert {b["mlm_labels"].shape[0] for b in seen} == {8 * settings.predictions}
    epoch = seen[:per_epoch]
    waste = sum(b["input_ids"].shape[0] - b["tokens"] for b in epoch) / sum(b["tokens"] for b in epoch)
    assert waste < 0.1, waste  # 4 buckets over batches of 8 short samples; bench/packing.py has real figures
    again = PretrainingLoader(pretraining_dataset(prepared, 48), 8, seed=2, packed=True, buckets=4)
    assert tuple(int(b) for b in again.collate.buckets) == buckets
    again.load_state_dict(state)
    replay = iter(again)
    for a in seen[3:]:
        assert same_batch(a, next(replay))
