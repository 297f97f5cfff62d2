"""A worker's job: one chunk of the input -> a Part (its kept documents' token ids and shapes) and
the counts of what it skipped (empty sentences, short documents, bad lines)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bert_fast.data.prepare.inputs import read_range
from bert_fast.data.prepare.settings import PrepareSettings
from bert_fast.data.prepare.wordpiece import Tokenizer

# What each kept document carries into its shard's counts: its bytes, its empty sentences, and the
# documents dropped and lines skipped since the previous kept document.
COUNTS = ("bytes", "empty_sentences", "short_documents", "non_utf8_lines", "long_lines", "bad_json_lines")


@dataclass
class Part:
    """Kept documents of a chunk, tokenized, in input order."""
    tokens: np.ndarray         # the vocab's dtype [T]
    lengths: np.ndarray        # int64 [S], tokens per kept sentence
    doc_sentences: np.ndarray  # int64 [D], kept sentences per document
    doc_tokens: np.ndarray     # int64 [D]
    ends: np.ndarray           # int64 [D, 2], input position (file index, byte) after each document
    counts: np.ndarray         # int64 [D, len(COUNTS)], what each document carries into its shard

    def split(self, n: int) -> tuple[Part, Part]:
        """(the first n documents, the rest)."""
        s, t = int(self.doc_sentences[:n].sum()), int(self.doc_tokens[:n].sum())
        return (Part(self.tokens[:t], self.lengths[:s], self.doc_sentences[:n], self.doc_tokens[:n],
                     self.ends[:n], self.counts[:n]),
                Part(self.tokens[t:], self.lengths[s:], self.doc_sentences[n:], self.doc_tokens[n:],
                     self.ends[n:], self.counts[n:]))


class ChunkTokenizer:
    """A worker's job: one chunk of the input -> (its kept documents as a Part, the counts after
    its last kept document, the number of non-UTF-8 lines)."""

    def __init__(self, vocab: Path, files, settings: PrepareSettings, threads: int):
        self.tok = Tokenizer(vocab, settings.lowercase, threads)
        self.files, self.settings = files, settings

    def _read(self, chunk: tuple[int, int, int]):
        """(documents, their end positions, their skipped-line counts, the counts after the last)."""
        docs, ends, skips, tail = [], [], [], np.zeros(len(COUNTS), dtype=np.int64)
        for sentences, end, skipped in read_range(self.files, *chunk, self.settings.max_line_chars):
            if sentences is None:
                tail[3:] += skipped
            else:
                docs.append(sentences)
                ends.append(end)
                skips.append(skipped)
        return docs, ends, skips, tail

    def __call__(self, chunk: tuple[int, int, int]) -> tuple[Part, np.ndarray, int]:
        docs, ends, skips, tail = self._read(chunk)
        sentences = list(itertools.chain.from_iterable(docs))
        ids, lengths = self.tok(sentences) if sentences else (np.zeros(0, self.tok.dtype), np.zeros(0, int))
        per_doc = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        doc_of = np.repeat(np.arange(len(docs)), per_doc)
        nonempty = lengths > 0
        kept = np.bincount(doc_of[nonempty], minlength=len(docs))
        keep = kept >= self.settings.min_sentences
        rows = np.zeros((len(docs), len(COUNTS)), dtype=np.int64)
        # A document's bytes: each sentence's UTF-8 and a line break.
        rows[:, 0] = [len("\n".join(d).encode()) + 1 if d else 0 for d in docs]
        rows[:, 1] = per_doc - kept
        rows[:, 2] = ~keep
        if docs:
            rows[:, 3:] = skips
        # Each row goes to the first kept document at or after it; rows after the last to the tail.
        owner = np.cumsum(keep) - keep
        counts = np.zeros((int(keep.sum()) + 1, len(COUNTS)), dtype=np.int64)
        np.add.at(counts, owner, rows)
        non_utf8 = int(rows[:, 3].sum() + tail[3])
        tail += counts[-1]
        keep_sentence = nonempty & keep[doc_of]
        doc_tokens = np.bincount(doc_of, weights=lengths, minlength=len(docs)).astype(np.int64)
        part = Part(tokens=ids[np.repeat(keep_sentence, lengths)], lengths=lengths[keep_sentence],
                    doc_sentences=kept[keep], doc_tokens=doc_tokens[keep],
                    ends=np.array(ends, dtype=np.int64).reshape(-1, 2)[keep], counts=counts[:-1])
        return part, tail, non_utf8
