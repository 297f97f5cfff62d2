"""The sample builder: C++ == the Python reference sample for sample, and the statistical and
structural properties of create_pretraining_data.py's algorithm on a larger corpus."""

import numpy as np
import pytest
from data_fixtures import VOCAB, random_corpus, settings

from bert_fast.data import builder
from bert_fast.labels import IGNORE_INDEX

pytestmark = pytest.mark.skipif(not builder.native_available(), reason="bert_fast._data is not built")


def build(corpus, s, epoch=0, backend="cpp"):
    return builder.build(corpus.tokens, corpus.word_starts, corpus.sentences, corpus.documents, s, epoch,
                         backend)


def first_difference(a, b):
    for key in a:
        if not np.array_equal(a[key], b[key]):
            rows = np.flatnonzero((a[key] != b[key]).reshape(len(a[key]), -1).any(1))
            return f"{key} differs first in sample {rows[0]}: {a[key][rows[0]]} vs {b[key][rows[0]]}"
    return None


@pytest.mark.parametrize("objective", ["nsp", "sop", "none"])
@pytest.mark.parametrize("whole_word_mask", [False, True])
@pytest.mark.parametrize("seed, epoch", [(0, 0), (7, 3)])
def test_cpp_matches_python_reference(objective, whole_word_mask, seed, epoch):
    """Every output array is identical: plans (segments, truncation, labels) and masks."""
    corpus = random_corpus(60, seed=seed)
    s = settings(max_seq_length=48, objective=objective, whole_word_mask=whole_word_mask, seed=seed,
                 short_seq_prob=0.3, mask_prob=0.2)
    cpp, ref = build(corpus, s, epoch, "cpp"), build(corpus, s, epoch, "python")
    assert len(cpp["plan"]) > 50
    assert first_difference(cpp, ref) is None, first_difference(cpp, ref)


def test_uint16_and_int32_tokens_and_threads_agree():
    corpus = random_corpus(300, seed=1)
    s = settings(max_seq_length=64, whole_word_mask=True)
    plan = builder.plan(corpus.sentences, corpus.documents, s, 0, threads=1)
    assert np.array_equal(plan, builder.plan(corpus.sentences, corpus.documents, s, 0, threads=4))
    out = {}
    for dtype, threads in ((np.uint16, 1), (np.int32, 3)):
        keys = np.arange(len(plan), dtype=np.int64)
        out[dtype] = builder.fill(corpus.tokens.astype(dtype), corpus.word_starts, corpus.doc_starts, plan, keys,
                                  keys, s, 0, builder.allocate(len(plan), s), threads=threads)
    assert first_difference(out[np.uint16], out[np.int32]) is None


def test_samples_depend_on_seed_and_epoch_only():
    """Same (seed, epoch): same samples however they are batched; other epochs or seeds differ."""
    corpus = random_corpus(200, seed=2)
    s = settings(max_seq_length=64)
    whole = build(corpus, s, epoch=1)
    plan, n = whole["plan"], len(whole["plan"])
    some = np.array([n - 1, 3, 17, 0], dtype=np.int64)
    out = builder.fill(corpus.tokens, corpus.word_starts, corpus.doc_starts, plan[some], some,
                       np.arange(4, dtype=np.int64), s, 1, builder.allocate(4, s))
    for key in builder.OUTPUTS:
        assert np.array_equal(out[key], whole[key][some]), key
    assert not np.array_equal(build(corpus, s, epoch=2)["nsp_label"][:50], whole["nsp_label"][:50])
    other = settings(max_seq_length=64, seed=1)
    assert not np.array_equal(build(corpus, other, epoch=1)["mlm_positions"][:50], whole["mlm_positions"][:50])


@pytest.fixture(scope="module")
def large():
    """~4000 documents of 2..16 sentences, the statistics corpus."""
    return random_corpus(4000, seed=3, sentences=(2, 16), length=(3, 30))


def special_mask(out, s):
    ids_orig = out["input_ids"].copy()
    rows, cols = np.nonzero(out["mlm_labels"] != IGNORE_INDEX)
    ids_orig[rows, out["mlm_positions"][rows, cols]] = out["mlm_labels"][rows, cols]
    real = np.arange(ids_orig.shape[1])[None, :] < out["lengths"][:, None]
    return ids_orig, real & ((ids_orig == s.cls_id) | (ids_orig == s.sep_id))


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_masking_statistics(large, mask_prob):
    s = settings(max_seq_length=128, mask_prob=mask_prob, short_seq_prob=0.1)
    out = build(large, s)
    original, special = special_mask(out, s)
    lengths = out["lengths"]
    chosen = out["mlm_labels"] != IGNORE_INDEX
    rows, cols = np.nonzero(chosen)
    pos = out["mlm_positions"][rows, cols]
    assert not special[rows, pos].any(), "a [CLS] or [SEP] was chosen for prediction"
    candidates = (lengths - special.sum(1)).sum()
    rate = chosen.sum() / candidates
    assert rate == pytest.approx(mask_prob, abs=0.01), rate
    new, label = out["input_ids"][rows, pos], out["mlm_labels"][rows, cols]
    masked, kept = (new == s.mask_id).mean(), (new == label).mean()
    replaced = 1 - masked - kept
    print(f"rate {rate:.4f} [MASK] {masked:.4f} kept {kept:.4f} random {replaced:.4f} of {len(new)}")
    # Each chosen token is an independent draw, so each fraction is binomial over len(new) draws:
    # allow 5 standard deviations (~0.005 at n = 1.3e5), tight enough to catch a 79/11/10 split.
    # A random token equals the original, or [MASK], with probability 1 / VOCAB each.
    expected = ((masked, 0.8 + 0.1 / VOCAB), (kept, 0.1 + 0.1 / VOCAB), (replaced, 0.1 - 0.2 / VOCAB))
    for got, p in expected:
        assert got == pytest.approx(p, abs=5 * np.sqrt(p * (1 - p) / len(new))), (got, p)
    # Positions are sorted, unique, inside the sequence; at most `predictions` per sequence.
    assert (chosen == (np.arange(chosen.shape[1]) < chosen.sum(1)[:, None])).all(), "labels come first"
    assert (np.diff(out["mlm_positions"], axis=1)[chosen[:, 1:]] > 0).all()
    assert (pos < lengths[rows]).all() and chosen.sum(1).max() <= s.predictions


def test_nsp_pairs(large):
    s = settings(max_seq_length=128, short_seq_prob=0.1)
    out = build(large, s)
    plan, label = out["plan"], out["nsp_label"]
    a0, a1, b0, b1 = plan[:, 0], plan[:, 1], plan[:, 2], plan[:, 3]
    # Google's algorithm forces "random next" for every one-sentence chunk (the last chunk of a
    # document often is one, and so are most chunks of a document given a short target), so short
    # documents tilt the balance above 1/2; long ones (Wikipedia-like) with full targets barely do.
    long_docs = random_corpus(1500, seed=4, sentences=(10, 60), length=(3, 30))
    balance = build(long_docs, settings(max_seq_length=128, short_seq_prob=0.0))["nsp_label"].mean()
    print(f"NSP random-next fraction {label.mean():.4f} (short docs), {balance:.4f} (long docs)")
    assert 0.5 < label.mean() < 0.62 and balance == pytest.approx(0.5, abs=0.04)
    assert ((a1 > a0) & (b1 > b0)).all() and ((a1 - a0) + (b1 - b0) <= s.max_seq_length - 3).all()
    assert (out["lengths"] == (a1 - a0) + (b1 - b0) + 3).all()
    doc_a, doc_b = large.doc_of_token(a0), large.doc_of_token(b0)
    assert (doc_a == large.doc_of_token(a1 - 1)).all() and (doc_b == large.doc_of_token(b1 - 1)).all()
    nxt = label == 0
    assert (doc_a[nxt] == doc_b[nxt]).all() and (b0[nxt] >= a1[nxt]).all(), "a true next B follows A"
    assert (doc_a[~nxt] != doc_b[~nxt]).all(), "a random next B comes from another document"
    # Most samples fill the target; 10% of documents target a shorter length.
    full = (out["lengths"] >= s.max_seq_length - 8).mean()
    assert 0.3 < full, full
    # Layout: [CLS] A [SEP] B [SEP], token types 0 then 1, padding after.
    i = int(np.argmax(label == 0))
    n_a, n = a1[i] - a0[i], out["lengths"][i]
    original, _ = special_mask(out, s)
    assert original[i, 0] == s.cls_id and original[i, n_a + 1] == s.sep_id and original[i, n - 1] == s.sep_id
    assert (original[i, 1:n_a + 1] == large.tokens[a0[i]:a1[i]]).all()
    assert (original[i, n_a + 2:n - 1] == large.tokens[b0[i]:b1[i]]).all()
    assert (out["token_type_ids"][i, :n_a + 2] == 0).all() and (out["token_type_ids"][i, n_a + 2:n] == 1).all()
    assert (out["input_ids"][i, n:] == s.pad_id).all() and (out["token_type_ids"][i, n:] == 0).all()


def test_sop_swaps_half_and_never_mixes_documents(large):
    s = settings(max_seq_length=128, objective="sop")
    out = build(large, s)
    a0, a1, b0, b1 = out["plan"][:, :4].T
    label = out["nsp_label"]
    docs = [large.doc_of_token(x) for x in (a0, a1 - 1, b0, b1 - 1)]
    assert all((d == docs[0]).all() for d in docs), "A and B come from one document"
    assert (b0[label == 0] >= a1[label == 0]).all() and (b1[label == 1] <= a0[label == 1]).all()
    print(f"SOP swapped fraction {label.mean():.4f}")
    assert label.mean() == pytest.approx(0.5, abs=0.03)


def test_none_packs_documents_to_full_length(large):
    s = settings(max_seq_length=128, objective="none")
    out = build(large, s)
    plan, lengths = out["plan"], out["lengths"]
    original, special = special_mask(out, s)
    assert (out["nsp_label"] == IGNORE_INDEX).all() and (out["token_type_ids"] == 0).all()
    # Consecutive rows tile the token stream; every row but the last is full, or one short when a
    # document ended with a single free slot.
    assert plan[0, 0] == 0 and (plan[1:, 0] == plan[:-1, 1]).all() and plan[-1, 1] == len(large.tokens)
    short = np.flatnonzero(lengths[:-1] < s.max_seq_length)
    assert (lengths[short] == s.max_seq_length - 1).all()
    assert np.isin(plan[short, 1], large.doc_starts).all()
    crossing = 0
    for i in range(len(plan)):
        n = lengths[i]
        body = original[i, 1:n - 1]
        inner = large.doc_starts[(large.doc_starts > plan[i, 0]) & (large.doc_starts < plan[i, 1])]
        crossing += len(inner) > 0
        assert (body == s.sep_id).sum() == len(inner)
        assert np.array_equal(body[body != s.sep_id], large.tokens[plan[i, 0]:plan[i, 1]])
    assert crossing > len(plan) // 2, "sequences run across document boundaries"


def word_groups(out, i, corpus, objective="nsp"):
    """Positions of sequence i grouped into whole words (never across [CLS]/[SEP])."""
    a0, a1, b0, b1 = out["plan"][i, :4]
    starts = np.concatenate([[1], corpus.word_starts[a0:a1], [1], corpus.word_starts[b0:b1], [1]])
    special = np.zeros(len(starts), bool)
    special[[0, a1 - a0 + 1, len(starts) - 1]] = True
    groups, current = [], None
    for p in range(len(starts)):
        if special[p]:
            current = None
        elif starts[p] or current is None:
            current = [p]
            groups.append(current)
        else:
            current.append(p)
    return groups


def test_whole_word_masking_masks_whole_words(large):
    s = settings(max_seq_length=128, whole_word_mask=True)
    out = build(large, s)
    multi = 0
    for i in range(300):
        chosen = set(out["mlm_positions"][i][out["mlm_labels"][i] != IGNORE_INDEX].tolist())
        for group in word_groups(out, i, large):
            hit = [p in chosen for p in group]
            assert all(hit) or not any(hit), f"sample {i}: word {group} partly masked ({chosen})"
            multi += all(hit) and len(group) > 1
    assert multi > 100, "multi-piece words were masked"
    # Without whole-word masking, words are split.
    out = build(large, settings(max_seq_length=128))
    partial = sum(0 < sum(p in set(out["mlm_positions"][i][out["mlm_labels"][i] != IGNORE_INDEX].tolist())
                          for p in g) < len(g) for i in range(300) for g in word_groups(out, i, large))
    assert partial > 50


def test_bad_arguments_are_refused():
    corpus = random_corpus(5)
    s = settings(max_seq_length=32)
    with pytest.raises(ValueError, match="sentences offsets must start at 0"):
        builder.plan(corpus.sentences[1:], corpus.documents, s, 0)
    with pytest.raises(ValueError, match="documents offsets end at"):
        builder.plan(corpus.sentences, corpus.documents[:-1], s, 0)
    with pytest.raises(ValueError, match="sentences offsets end at"):
        builder.check_offsets(corpus.sentences, corpus.documents, len(corpus.tokens) + 1)
    with pytest.raises(TypeError, match="sentences must hold integers"):
        builder.plan(corpus.sentences.astype(float), corpus.documents, s, 0)
    with pytest.raises(ValueError, match="epoch must be an int"):
        builder.plan(corpus.sentences, corpus.documents, s, -1)
    with pytest.raises(ValueError, match="backend must be one of"):
        builder.plan(corpus.sentences, corpus.documents, s, 0, backend="rust")
    with pytest.raises(ValueError, match="objective must be one of"):
        settings(objective="mlm")
    with pytest.raises(ValueError, match="mask_id must be an int in"):
        settings(mask_id=VOCAB)
    plan = builder.plan(corpus.sentences, corpus.documents, s, 0)
    keys = np.arange(len(plan), dtype=np.int64)
    with pytest.raises(ValueError, match="rows: index out of range"):
        builder.fill(corpus.tokens, corpus.word_starts, corpus.doc_starts, plan, keys, keys + 1, s, 0,
                     builder.allocate(len(plan), s))
    with pytest.raises(ValueError, match="epoch must be an int"):
        builder.fill(corpus.tokens, corpus.word_starts, corpus.doc_starts, plan, keys, keys, s, -1,
                     builder.allocate(len(plan), s))
    twice = keys.copy()
    twice[-1] = 0
    with pytest.raises(ValueError, match="rows: row 0 given twice"):
        builder.fill(corpus.tokens, corpus.word_starts, corpus.doc_starts, plan, keys, twice, s, 0,
                     builder.allocate(len(plan), s))
    bad = plan.copy()
    bad[0, 1] = len(corpus.tokens) + 5
    with pytest.raises(ValueError, match="plan row 0 is out of range"):
        builder.fill(corpus.tokens, corpus.word_starts, corpus.doc_starts, bad, keys, keys, s, 0,
                     builder.allocate(len(plan), s))
    with pytest.raises(TypeError, match="tokens must be a 1-D uint16 or int32"):
        builder.fill(corpus.tokens.astype(np.int64), corpus.word_starts, corpus.doc_starts, plan, keys, keys, s,
                     0, builder.allocate(len(plan), s))
    with pytest.raises(ValueError, match="mlm_positions and mlm_labels must be"):
        out = builder.allocate(len(plan), s)
        out["mlm_labels"] = out["mlm_labels"][:, :-1].copy()
        builder.fill(corpus.tokens, corpus.word_starts, corpus.doc_starts, plan, keys, keys, s, 0, out)
