"""Dataset, sampler, collate and loader: deterministic for any rank layout, resumable, and
batches that match the model's contract; plus the embedded corpus's text rules."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import prepared_corpus, pretraining_dataset, same_batch, take, text_documents

from bert_fast.data import builder, corpus
from bert_fast.data.dataset import (
    PretrainingDataset,
    PretrainingLoader,
    ResumableSampler,
    collate,
)

pytestmark = pytest.mark.skipif(not builder.native_available(), reason="bert_fast._data is not built")


@pytest.mark.parametrize("size", [1, 10, 11, 97])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sampler_is_disjoint_and_complete(size, world_size):
    streams = [list(ResumableSampler(size, rank, world_size, seed=5, epoch=1)) for rank in range(world_size)]
    assert len({len(s) for s in streams}) == 1 and len(streams[0]) == -(-size // world_size)
    flat = [i for s in streams for i in s]
    assert sorted(set(flat)) == list(range(size)), "every sample is seen"
    assert len(flat) - len(set(flat)) == len(streams[0]) * world_size - size, "only the padding repeats"
    again = ResumableSampler(size, 0, world_size, seed=5, epoch=1)
    assert list(again) == streams[0]
    if size > 5:
        assert list(ResumableSampler(size, 0, world_size, seed=5, epoch=2)) != streams[0]


@pytest.mark.parametrize("world_size, consumed", [(1, 7), (2, 8), (3, 9)])
def test_sampler_resumes_the_remaining_stream(world_size, consumed):
    size = 40
    for rank in range(world_size):
        full = list(ResumableSampler(size, rank, world_size, seed=1, epoch=3))
        resumed = ResumableSampler(size, rank, world_size, seed=1)
        resumed.load_state_dict({"epoch": 3, "consumed": consumed, "seed": 1})
        assert list(resumed) == full[consumed // world_size:]
    # After a resume on another rank layout the rest is still split disjointly and completely.
    order = ResumableSampler(size, 0, 1, seed=1, epoch=3).order()
    rest = [i for r in range(2) for i in ResumableSampler(size, r, 2, seed=1, epoch=3, consumed=consumed)]
    assert sorted(rest) == sorted(order[consumed:].tolist() + order[:len(rest) - (size - consumed)].tolist())


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank must be an int in"):
        ResumableSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        ResumableSampler(10, world_size=0)
    with pytest.raises(ValueError, match="consumed must be an int in"):
        ResumableSampler(10, consumed=11)
    with pytest.raises(ValueError, match="sampler state has seed 2"):
        ResumableSampler(10, seed=1).load_state_dict({"epoch": 0, "consumed": 0, "seed": 2})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("prepared"), text_documents(400, seed=7, sentences=(2, 10)),
                           shard_tokens=4000)


def dataset(prepared, **kwargs):
    return pretraining_dataset(prepared, 64, **kwargs)


def test_samples_do_not_depend_on_rank_layout_or_batching(prepared):
    data = dataset(prepared, whole_word_mask=True)
    assert prepared.num_shards > 2 and len(data) > 100
    everything = data.__getitems__(range(len(data)))
    for world_size in (2, 3):
        for rank in range(world_size):
            indices = list(ResumableSampler(len(data), rank, world_size, seed=0))
            for batch in (indices[:5], indices[5:6], indices[6:40]):
                got = data.__getitems__(batch)
                for key in builder.OUTPUTS:
                    assert np.array_equal(got[key], everything[key][batch]), key
    python = PretrainingDataset(prepared, data.settings, backend="python").__getitems__([0, 5, len(data) - 1])
    for key in builder.OUTPUTS:
        assert np.array_equal(python[key], everything[key][[0, 5, len(data) - 1]]), key
    with pytest.raises(IndexError, match="sample indices must lie in"):
        data.__getitems__([len(data)])


def test_identical_shards_are_planned_independently(tmp_path):
    """Two shards holding the same documents must not get the same pairs: planning draws are keyed
    by the document's index within its shard, so each shard needs its own stream."""
    half = text_documents(60, seed=9, sentences=(2, 10))
    whole = prepared_corpus(tmp_path / "whole", half + half, shard_tokens=10**9)
    two = prepared_corpus(tmp_path / "two", half + half, shard_tokens=whole.manifest["totals"]["tokens"] // 2)
    assert two.num_shards == 2
    shards = [two.shard(i) for i in range(2)]
    assert all(np.array_equal(shards[0].tokens, s.tokens) and np.array_equal(shards[0].sentences, s.sentences)
               for s in shards), "the two shards hold the same documents"
    data = dataset(two, short_seq_prob=0.5)
    assert not np.array_equal(data.plans[0], data.plans[1])


def test_collate_matches_the_model_contract(prepared):
    from bert_fast import BertConfig, BertForPreTraining

    data = dataset(prepared)
    arrays = data.__getitems__(list(range(0, 64, 3)))
    batch = collate(arrays)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width - 8 < arrays["lengths"].max() <= width
    assert torch.equal(batch["attention_mask"].sum(1), torch.from_numpy(arrays["lengths"]).long())
    labels = batch["mlm_labels"]
    rows, cols = np.nonzero(arrays["mlm_labels"] != -100)
    assert (labels != -100).sum() == len(rows)
    assert torch.equal(labels[rows, arrays["mlm_positions"][rows, cols]],
                       torch.from_numpy(arrays["mlm_labels"][rows, cols]).long())
    assert ((labels == -100) | batch["attention_mask"].bool()).all()
    assert all(v.dtype == torch.int64 for v in batch.values())
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=prepared.vocab_size, backend="torch"))
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.mlm_loss > 0 and out.nsp_loss > 0


def test_loader_resumes_mid_epoch_and_across_epochs(prepared):
    data = dataset(prepared)
    batches_per_epoch = -(-len(data) // 16)
    loader = PretrainingLoader(data, batch_size=16, seed=3)
    stream = iter(loader)
    first = take(stream, 5)
    state = dict(loader.state_dict())
    assert state == {"epoch": 0, "consumed": 80, "seed": 3}
    rest = take(stream, batches_per_epoch + 3)
    assert loader.state_dict()["epoch"] == 1

    again = PretrainingLoader(dataset(prepared), batch_size=16, seed=3)
    again.load_state_dict(state)
    replay = take(iter(again), len(rest))
    for a, b in zip(rest, replay):
        assert same_batch(a, b)
    assert not torch.equal(first[0]["input_ids"][:, :8], rest[-1]["input_ids"][:, :8])


@pytest.mark.slow
def test_loader_workers_give_the_same_batches(prepared):
    plain = take(iter(PretrainingLoader(dataset(prepared), batch_size=8, seed=1)), 6)
    workers = take(iter(PretrainingLoader(dataset(prepared), batch_size=8, seed=1, workers=2, prefetch=2)), 6)
    for a, b in zip(plain, workers):
        assert same_batch(a, b)


def test_corpus_text_rules():
    doc = '''The summary line is here. A second sentence follows! Too short.

    Args:
        x: indented lines are code or parameter lists, dropped.

    >>> import os

    The final paragraph has "quotes." Then more text
    is here, on two lines.
    '''
    assert corpus.document_sentences(doc) == ["The summary line is here.", "A second sentence follows!",
                                              'The final paragraph has "quotes."',
                                              "Then more text is here, on two lines."]
    assert corpus.document_sentences(None) == []
    small = ("json", "textwrap")
    docs = corpus.gather_documents(small)
    assert docs == corpus.gather_documents(small) and len(docs) > 5
    assert all(len(d) >= 2 and all(len(s.split()) >= 4 for s in d) for d in docs)


def test_default_corpus_is_built_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_gather():
        calls.append(1)
        return [["One two three four.", "Five six seven eight."]]

    monkeypatch.setattr(corpus, "gather_documents", fake_gather)
    path = corpus.default_corpus(tmp_path)
    assert path.read_text() == "One two three four.\nFive six seven eight.\n"
    assert corpus.default_corpus(tmp_path) == path and len(calls) == 1


def _prepare_with_peer(barrier, root, out):
    from bert_fast.data.corpus import default_prepared
    from bert_fast.data.shards import PreparedCorpus

    barrier.wait()  # both start on the cold cache together, as the ranks of one launch do
    try:
        corpus = PreparedCorpus(default_prepared(8192, root=Path(root)))
        for i in range(len(corpus.manifest["shards"])):  # every shard's sha256 is checked on opening
            corpus.shard(i)
        Path(out).write_text(corpus.manifest["vocab"]["sha256"])
    except Exception as err:
        Path(out).write_text(f"{type(err).__name__}: {err}")


@pytest.mark.slow
def test_ranks_preparing_the_cached_corpus_at_once_share_one_preparation(tmp_path):
    # Vocab training (`tokenizers`) differs from run to run, so two preparations at once would
    # leave each rank with its own vocab, or one reading files the other replaces.
    import multiprocessing

    from bert_fast.data.corpus import default_prepared

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_prepare_with_peer, args=(barrier, str(tmp_path / "cache"), str(tmp_path / f"r{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    seen = [(tmp_path / f"r{i}").read_text() for i in range(2)]
    on_disk = json.loads((default_prepared(8192, root=tmp_path / "cache") / "manifest.json").read_text())
    assert seen == [on_disk["vocab"]["sha256"]] * 2, seen
