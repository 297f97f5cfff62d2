"""prepare's shards on disk: cutting the tokenized documents into shards of about `shard_tokens`
tokens and writing each (arrays, then its record), and finding the complete ones to resume after."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from bert_fast.data.prepare.chunk import COUNTS, Part
from bert_fast.data.prepare.settings import PrepareSettings
from bert_fast.data.shards import ARRAYS, shard_name
from bert_fast.fileio import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger("bert_fast.data")
ALWAYS_COUNTED = ("bytes", "empty_sentences")  # in a shard's counts even when 0


class ShardWriter:
    """Collects tokenized documents and writes a shard each time `shard_tokens` are reached."""

    def __init__(self, output: Path, words: list[str], settings: PrepareSettings, fingerprint: str,
                 first_shard: int, stats: Counter):
        self.output, self.settings, self.fingerprint = output, settings, fingerprint
        self.word_start = np.array([not w.startswith("##") for w in words], dtype=np.uint8)
        self.next_shard, self.stats = first_shard, stats  # stats: totals up to the last written shard
        self.parts: list[Part] = []
        self.tokens = 0
        self.carry = np.zeros(len(COUNTS), dtype=np.int64)  # counts since the last kept document

    def add(self, part: Part, tail: np.ndarray) -> None:
        if not len(part.doc_tokens):
            self.carry += tail
            return
        part.counts[0] += self.carry
        self.carry = tail
        while len(part.doc_tokens):
            reached = self.tokens + np.cumsum(part.doc_tokens)
            n = int(np.searchsorted(reached, self.settings.shard_tokens)) + 1  # documents up to the size
            if n > len(reached):
                self.parts.append(part)
                self.tokens = int(reached[-1])
                return
            head, part = part.split(n)
            self.parts.append(head)
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        parts, self.parts, self.tokens = self.parts, [], 0
        tokens = np.concatenate([p.tokens for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        doc_sentences = np.concatenate([p.doc_sentences for p in parts])
        arrays = {
            "tokens": tokens,
            "word_starts": self.word_start[tokens],
            "sentences": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "documents": np.concatenate([[0], np.cumsum(doc_sentences)]).astype(np.int64),
        }
        summed = sum(p.counts.sum(axis=0) for p in parts)
        counts = {k: int(v) for k, v in zip(COUNTS, summed) if v or k in ALWAYS_COUNTED}
        counts.update(documents=len(doc_sentences), sentences=len(lengths), tokens=len(tokens))
        name = shard_name(self.next_shard)
        files = {}
        for key in ARRAYS:
            path = self.output / f"{name}.{key}.npy"
            _write_array(path, arrays[key])
            files[key] = {"file": path.name, "sha256": sha256_file(path)}
        self.stats.update(counts)
        record = {"name": name, "fingerprint": self.fingerprint, "end": [int(v) for v in parts[-1].ends[-1]],
                  "counts": dict(sorted(counts.items())), "totals": dict(sorted(self.stats.items())),
                  "files": files}
        atomic_write_text(self.output / f"{name}.json", json.dumps(record, indent=1))
        log.info("wrote %s: %d documents, %d tokens", name, len(doc_sentences), len(tokens))
        self.next_shard += 1


def _write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def complete_shards(output: Path, fingerprint: str) -> list[dict]:
    """Records of shards 0, 1, ... that belong to this run's fingerprint and whose files check out."""
    records = []
    while True:
        path = output / f"{shard_name(len(records))}.json"
        if not path.is_file():
            return records
        try:
            record = json.loads(path.read_text())
        except ValueError:
            return records
        if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
            return records
        for entry in record["files"].values():
            file = output / entry["file"]
            if not file.is_file() or sha256_file(file) != entry["sha256"]:
                log.warning("%s does not match its record; preparing from shard %d again", file, len(records))
                return records
        records.append(record)
