"""Corpora for the data tests: tokenized ones made directly as arrays (no tokenizer needed), and
text ones prepared into shards, with the dataset and loader helpers the loader tests share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bert_fast.data.dataset import PretrainingDataset
from bert_fast.data.prepare import PrepareSettings, prepare
from bert_fast.data.settings import SampleSettings
from bert_fast.data.shards import PreparedCorpus

VOCAB = 1000
SPECIAL = dict(vocab_size=VOCAB, pad_id=0, cls_id=2, sep_id=3, mask_id=4)
FIRST_WORD = 5  # ids below are special tokens


@dataclass
class Corpus:
    tokens: np.ndarray       # uint16 [T]
    word_starts: np.ndarray  # uint8 [T]
    sentences: np.ndarray    # int64 [S + 1]
    documents: np.ndarray    # int64 [D + 1]

    @property
    def doc_starts(self) -> np.ndarray:
        return self.sentences[self.documents[:-1]]

    def doc_of_token(self, t: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_starts, t, side="right") - 1


def random_corpus(docs: int, seed: int = 0, sentences=(1, 12), length=(1, 40)) -> Corpus:
    """`docs` documents of uniform-random sentence counts and lengths, token ids >= FIRST_WORD,
    70% of tokens starting a word (the rest are `##` continuations)."""
    rng = np.random.default_rng(seed)
    per_doc = rng.integers(sentences[0], sentences[1] + 1, docs)
    lengths = rng.integers(length[0], length[1] + 1, per_doc.sum())
    sent = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    documents = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
    tokens = rng.integers(FIRST_WORD, VOCAB, sent[-1]).astype(np.uint16)
    word_starts = (rng.random(sent[-1]) < 0.7).astype(np.uint8)
    word_starts[sent[:-1]] = 1  # sentences start with a word
    return Corpus(tokens, word_starts, sent, documents)


def settings(**kwargs) -> SampleSettings:
    return SampleSettings(**{**SPECIAL, **kwargs})


WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega tensor matrix vector "
         "kernel shard token corpus model layer batch sample mask random next sentence document "
         "reading writing training lowered raised faster slower checkpoint gradient").split()


def write_vocab(path) -> None:
    """A WordPiece vocab: the special tokens, single letters and their `##` forms, WORDS, `.`."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + letters + ["##" + c for c in letters]
    words += WORDS + ["##ing", "##ed", "##s"]
    path.write_text("\n".join(words) + "\n")


def text_documents(docs: int, seed: int = 0, sentences=(2, 6)) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(docs):
        doc = []
        for _ in range(rng.integers(sentences[0], sentences[1] + 1)):
            words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(3, 12))]
            doc.append(" ".join(words).capitalize() + ".")
        out.append(doc)
    return out


def write_text(path, documents) -> None:
    path.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n", encoding="utf-8")


def prepared_corpus(folder: Path, documents, shard_tokens: int) -> PreparedCorpus:
    """`documents` written as text into `folder` and prepared with write_vocab's vocab into
    folder/out, in shards of about `shard_tokens` tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    write_vocab(folder / "vocab.txt")
    write_text(folder / "a.txt", documents)
    prepare(folder / "a.txt", folder / "out", vocab=folder / "vocab.txt",
            settings=PrepareSettings(shard_tokens=shard_tokens))
    return PreparedCorpus(folder / "out")


def pretraining_dataset(corpus: PreparedCorpus, max_seq_length: int, **settings) -> PretrainingDataset:
    """The samples of `corpus` (its vocab's special ids) under these SampleSettings."""
    return PretrainingDataset(corpus, PretrainingDataset.settings_for(corpus, max_seq_length=max_seq_length,
                                                                      **settings))


def take(iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


def same_batch(a: dict, b: dict) -> bool:
    """Whether two batches hold the same keys with equal values (tensors element for element)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                        for k in a)
