"""The readable Python reference of the sample builder (csrc/data/builder.cpp does the same,
draw for draw, and the tests compare the two sample for sample).

It follows Google's create_pretraining_data.py (github.com/google-research/bert):
`create_instances_from_document`, `truncate_seq_pair` and `create_masked_lm_predictions`, with
these deliberate differences, all for determinism or correctness:
- randomness comes from `Rng` streams keyed by (seed, epoch, document) for planning and (seed,
  epoch, sample) for masking, so any rank layout or thread count gives the same samples;
- segments are token ranges of the shard (a segment is consecutive sentences, so it is one range),
  and a "random next" B comes from another document of the same shard (Google's: of everything it
  holds in memory); shards hold ~16M tokens by default, so the choice is as wide in practice;
- the masking budget is `mask_prob` times the non-special tokens (Google counts [CLS]/[SEP] too);
- whole-word groups never reach across [CLS]/[SEP] (Google's can glue a `##` piece that starts
  segment B onto the last word of A);
- 80/10/10 is one draw in [0, 10), the random token uniform over the whole vocabulary (as Google's);
- `sop` (ALBERT) never takes B from another document: a one-sentence chunk is split inside the
  sentence, and a one-token chunk yields no sample.

Kept from Google's, and worth knowing: a chunk of one sentence always gets a "random next" B, so
on short documents (the last chunk of a document is often one sentence) more than half of the
pairs are random next (~53% on Wikipedia-like documents, ~59-65% on short ones); the target length
is drawn once per document, not per sample.

A plan row is (a_begin, a_end, b_begin, b_end, label) in shard token offsets; for `none` it is
(begin, end, 0, 0, -100) and [SEP] goes before every document start inside [begin, end).
"""

from __future__ import annotations

import math

import numpy as np

from bert_fast.data.rng import DOMAIN_MASK, DOMAIN_PLAN, Rng
from bert_fast.data.settings import SampleSettings
from bert_fast.labels import IGNORE_INDEX


def _truncate_pair(a: list, b: list, max_tokens: int, rng: Rng) -> None:
    """truncate_seq_pair: drop a token from the front or back (at random) of the longer segment."""
    while (a[1] - a[0]) + (b[1] - b[0]) > max_tokens:
        longer = a if a[1] - a[0] > b[1] - b[0] else b
        if rng.random() < 0.5:
            longer[0] += 1
        else:
            longer[1] -= 1


def plan_document(doc: int, sentences: np.ndarray, documents: np.ndarray, s: SampleSettings,
                  epoch: int) -> list[tuple[int, int, int, int, int]]:
    """Pairs cut from document `doc` (create_instances_from_document)."""
    rng = Rng(s.seed, epoch, doc, DOMAIN_PLAN)
    n_docs = len(documents) - 1
    first, last = int(documents[doc]), int(documents[doc + 1])
    max_tokens = s.max_seq_length - 3
    target = max_tokens
    # Once per document, as in Google's code: 10% of documents give shorter sequences.
    if rng.random() < s.short_seq_prob:
        target = rng.randint(2, max_tokens)
    out = []
    chunk_start, length, i = first, 0, first
    while i < last:
        length += int(sentences[i + 1] - sentences[i])
        if i == last - 1 or length >= target:
            k = i + 1 - chunk_start
            a_end = rng.randint(1, k - 1) if k >= 2 else 1
            a = [int(sentences[chunk_start]), int(sentences[chunk_start + a_end])]
            b = [a[1], int(sentences[i + 1])]
            if s.objective == "nsp":
                label = 0
                if k == 1 or rng.random() < 0.5:
                    label = 1
                    target_b = target - (a[1] - a[0])
                    other = doc
                    for _ in range(10):
                        other = rng.randint(0, n_docs - 1)
                        if other != doc:
                            break
                    o_first, o_last = int(documents[other]), int(documents[other + 1])
                    j = o_first + rng.randint(0, o_last - o_first - 1)
                    b = [int(sentences[j]), int(sentences[j])]
                    while j < o_last:
                        b[1] = int(sentences[j + 1])
                        if b[1] - b[0] >= target_b:
                            break
                        j += 1
                    i -= k - a_end  # the unused sentences start the next chunk ("put back")
                out_row = (a, b, label)
            elif k == 1 and a[1] - a[0] < 2:  # sop, one single-token sentence: nothing to split
                out_row = None
            else:  # sop
                if k == 1:  # split the one sentence so that B still comes from this document
                    cut = a[0] + rng.randint(1, a[1] - a[0] - 1)
                    a, b = [a[0], cut], [cut, a[1]]
                label = 0
                if rng.random() < 0.5:
                    a, b, label = b, a, 1
                out_row = (a, b, label)
            if out_row is not None:
                a, b, label = out_row
                _truncate_pair(a, b, max_tokens, rng)
                out.append((a[0], a[1], b[0], b[1], label))
            chunk_start, length = i + 1, 0
        i += 1
    return out


def plan_packed(sentences: np.ndarray, documents: np.ndarray, s: SampleSettings) -> list[tuple]:
    """`none`: documents back to back in full-length sequences, [SEP] between documents. A
    document that ends with exactly one free slot closes the sequence instead (one token short)."""
    budget = s.max_seq_length - 2  # [CLS] ... [SEP]
    out, used, start, p = [], 0, 0, 0
    for doc in range(len(documents) - 1):
        p, end = int(sentences[documents[doc]]), int(sentences[documents[doc + 1]])
        while p < end:
            if used == 0:
                start = p
            take = min(end - p, budget - used)
            used, p = used + take, p + take
            if used == budget:
                out.append((start, p, 0, 0, IGNORE_INDEX))
                used = 0
        if used > 0:
            if used + 1 < budget:
                used += 1  # the [SEP] before the next document
            else:
                out.append((start, p, 0, 0, IGNORE_INDEX))
                used = 0
    if used > 0:
        out.append((start, p, 0, 0, IGNORE_INDEX))
    return out


def plan(sentences: np.ndarray, documents: np.ndarray, s: SampleSettings, epoch: int) -> np.ndarray:
    """All plan rows of one shard for `epoch`, int64 [n, 5]."""
    if s.objective == "none":
        rows = plan_packed(sentences, documents, s)
    else:
        rows = [r for d in range(len(documents) - 1)
                for r in plan_document(d, sentences, documents, s, epoch)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5)


def _sequence(tokens, word_starts, doc_starts, row, s: SampleSettings):
    """Token ids, token types, word-start flags and special flags of one plan row."""
    a0, a1, b0, b1, _ = (int(v) for v in row)
    ids, types, starts, special = [s.cls_id], [0], [True], [True]
    if s.objective == "none":
        doc_bounds = set(int(d) for d in doc_starts[(doc_starts > a0) & (doc_starts < a1)])
        for t in range(a0, a1):
            if t in doc_bounds:
                ids.append(s.sep_id), types.append(0), starts.append(True), special.append(True)
            ids.append(int(tokens[t])), types.append(0), starts.append(bool(word_starts[t]))
            special.append(False)
    else:
        for (lo, hi), segment in (((a0, a1), 0), ((b0, b1), 1)):
            for t in range(lo, hi):
                ids.append(int(tokens[t])), types.append(segment), starts.append(bool(word_starts[t]))
                special.append(False)
            ids.append(s.sep_id), types.append(segment), starts.append(True), special.append(True)
        return ids, types, starts, special
    ids.append(s.sep_id), types.append(0), starts.append(True), special.append(True)
    return ids, types, starts, special


def mask_sequence(ids: list[int], starts: list[bool], special: list[bool], s: SampleSettings,
                  epoch: int, key: int) -> list[tuple[int, int]]:
    """create_masked_lm_predictions: masks `ids` in place, returns sorted (position, label)."""
    rng = Rng(s.seed, epoch, key, DOMAIN_MASK)
    groups: list[list[int]] = []
    for i in range(len(ids)):
        if special[i]:
            continue
        if s.whole_word_mask and groups and not starts[i] and not special[i - 1]:
            groups[-1].append(i)
        else:
            groups.append([i])
    for i in range(len(groups) - 1, 0, -1):  # Fisher-Yates, as Python's random.shuffle
        j = rng.below(i + 1)
        groups[i], groups[j] = groups[j], groups[i]
    candidates = len(ids) - sum(special)
    budget = min(s.predictions, max(1, math.floor(candidates * s.mask_prob + 0.5)))
    chosen: list[tuple[int, int]] = []
    for group in groups:
        if len(chosen) >= budget:
            break
        if len(chosen) + len(group) > budget:
            continue
        for i in group:
            original = ids[i]
            r = rng.below(10)
            if r < 8:
                ids[i] = s.mask_id
            elif r == 9:
                ids[i] = rng.below(s.vocab_size)
            chosen.append((i, original))
    return sorted(chosen)


def fill(tokens: np.ndarray, word_starts: np.ndarray, doc_starts: np.ndarray, plan_rows: np.ndarray,
         keys: np.ndarray, rows: np.ndarray, s: SampleSettings, epoch: int, out: dict) -> None:
    """Writes sample `keys[i]` (plan row `plan_rows[i]`) into row `rows[i]` of the `out` arrays
    (input_ids, token_type_ids, lengths, mlm_positions, mlm_labels, nsp_label)."""
    for plan_row, key, row in zip(plan_rows, keys, rows):
        ids, types, starts, special = _sequence(tokens, word_starts, doc_starts, plan_row, s)
        chosen = mask_sequence(ids, starts, special, s, epoch, int(key))
        n = len(ids)
        out["input_ids"][row, :n] = ids
        out["input_ids"][row, n:] = s.pad_id
        out["token_type_ids"][row, :n] = types
        out["token_type_ids"][row, n:] = 0
        out["lengths"][row] = n
        out["mlm_positions"][row] = 0
        out["mlm_labels"][row] = IGNORE_INDEX
        for j, (position, label) in enumerate(chosen):
            out["mlm_positions"][row, j] = position
            out["mlm_labels"][row, j] = label
        out["nsp_label"][row] = plan_row[4]
