"""Sentences -> WordPiece ids, as prepare's workers tokenize them (the C++ fast path of
csrc/data/wordpiece.cpp where it applies, `tokenizers` elsewhere)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from bert_fast.data.hf_tokenizer import wordpiece
from bert_fast.data.shards import read_vocab, special_ids, token_dtype


class Tokenizer:
    """WordPiece ids per sentence: ASCII sentences through the C++ fast path (bert_fast._data,
    identical to `tokenizers` on ASCII, several times faster), the rest through `tokenizers`."""

    def __init__(self, vocab: Path, lowercase: bool, threads: int = 0):
        from bert_fast.data.builder import _data

        self.words = read_vocab(vocab)
        self.tokenizer = wordpiece(vocab, lowercase)
        unk = special_ids(self.words)["unk_id"]
        # `tokenizers` trims the end of every vocab line; the fast path must see the same words.
        trimmed = [w.rstrip() for w in self.words]
        self.fast = None if _data is None else _data.WordPiece(trimmed, lowercase, unk)
        self.dtype = token_dtype(len(self.words))
        self.threads = threads
        self.word_start = np.array([not w.startswith("##") for w in self.words], dtype=np.uint8)

    def _slow(self, sentences: list[str]):
        encodings = self.tokenizer.encode_batch(sentences, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32,
                          count=int(lengths.sum()))
        return ids, lengths

    def __call__(self, sentences: list[str]):
        """Token ids (concatenated, the vocab's dtype) and the token count of each sentence."""
        if self.fast is None:
            ids, lengths = self._slow(sentences)
            return ids.astype(self.dtype), lengths
        ascii_mask = np.fromiter((s.isascii() for s in sentences), dtype=bool, count=len(sentences))
        if ascii_mask.all():
            ids, lengths = self.fast.encode(sentences, self.threads)
            return ids.astype(self.dtype), lengths
        other = np.flatnonzero(~ascii_mask)
        fast_ids, fast_len = self.fast.encode([s for s, a in zip(sentences, ascii_mask) if a], self.threads)
        slow_ids, slow_len = self._slow([sentences[i] for i in other])
        lengths = np.empty(len(sentences), dtype=np.int64)
        lengths[ascii_mask], lengths[other] = fast_len, slow_len
        # Scatter both id streams to their sentences' places in the output.
        ends = np.cumsum(lengths)
        ids = np.empty(int(ends[-1]) if len(ends) else 0, dtype=self.dtype)
        parts = ((np.flatnonzero(ascii_mask), fast_ids, fast_len), (other, slow_ids, slow_len))
        for which, part, part_len in parts:
            starts = np.repeat(ends[which] - lengths[which], part_len)
            within = np.arange(len(part)) - np.repeat(np.cumsum(part_len) - part_len, part_len)
            ids[starts + within] = part
        return ids, lengths
