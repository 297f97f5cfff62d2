"""`bert-fast data prepare`: raw text -> WordPiece ids -> shards + manifest.json (see shards.py).

Input formats (by extension, or `fmt`):
- text: one sentence per line, a blank line between documents (the original BERT format);
- JSONL (`.jsonl`, `.json`): one document per line, its `text` field cut into sentences at line
  breaks and by `sentences.split_sentences` (., ! or ? then whitespace then a capital, digit or quote).

It streams and uses every core: each input file is cut into chunks of about `batch_chars` bytes at
document boundaries (a blank line in text, any line in JSONL), and a pool of `workers` processes
reads, splits and tokenizes whole chunks (ASCII sentences by the C++ WordPiece in
csrc/data/wordpiece.cpp, which gives the `tokenizers` library's ids ~20x faster; the others by
`tokenizers` itself). The parent takes the chunks back in input order (at most two per worker in
flight), cuts them into shards of about `shard_tokens` tokens and writes them, so the output does
not depend on the number of workers, and memory is bounded by the chunk and shard sizes, not the
corpus. A line longer than `max_line_chars` bytes is skipped without being held in memory.
Skips are counted, logged, and recorded in the manifest: non-UTF-8 bytes (replaced by U+FFFD, with
a warning naming the file), over-long lines, bad JSON lines, sentences with no tokens, documents
with fewer than `min_sentences` sentences. A file that is not text (a NUL byte, or more than
`max_non_utf8_share` of its lines not UTF-8; textcheck.py) is refused before a vocab or a shard
sees any of it. Re-running with the same inputs and settings keeps every complete shard whose
checksums hold and resumes after the last one; a finished corpus is left as it is.

This module runs those steps in order; each lives in a module of its own:
settings.py   PrepareSettings
inputs.py     finding the input files, the text check, chunks at document boundaries, reading documents
vocab.py      the given vocab copied in, or one trained with `tokenizers`
wordpiece.py  sentences -> WordPiece ids (C++ fast path, `tokenizers` for the rest)
chunk.py      a worker's job: a chunk -> its kept documents' ids and the counts of what was skipped
pool.py       the worker processes, results in input order
writer.py     shards written as they fill up; the complete ones found again to resume after
manifest.py   the fingerprint, the finished check and manifest.json
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from bert_fast.data.prepare.inputs import check_texts, chunk_ranges, input_files
from bert_fast.data.prepare.manifest import MANIFEST, fingerprint_of, finished, write_manifest
from bert_fast.data.prepare.pool import tokenized, worker_count
from bert_fast.data.prepare.settings import PrepareSettings
from bert_fast.data.prepare.vocab import TRAINED_FILE, VOCAB_FILE, place_vocab, short_vocab, vocab_changes
from bert_fast.data.prepare.writer import ShardWriter, complete_shards
from bert_fast.data.shards import read_vocab
from bert_fast.fileio import exclusive, sha256_file

__all__ = ["PrepareSettings", "prepare"]
log = logging.getLogger("bert_fast.data")


def prepare(inputs, output: str | Path, vocab: str | Path | None = None, fmt: str = "auto",
            settings: PrepareSettings | None = None) -> dict:
    """Prepares `inputs` (files or folders) into `output`; returns the manifest (also written).
    One process at a time per output folder: the others wait, then find it prepared."""
    files = input_files(inputs, fmt)  # bad inputs are refused before the output folder is made
    settings = settings or PrepareSettings()
    with exclusive(Path(output) / ".prepare.lock"):
        manifest, fresh = _prepare(files, Path(output), vocab, settings)
    trained = (Path(output) / TRAINED_FILE).is_file()
    note = short_vocab(settings.vocab_size if trained else None, manifest["vocab"]["size"])
    if note:  # a warning when the vocab is trained; a corpus found prepared only repeats it as info
        log.log(logging.WARNING if fresh else logging.INFO, "%s: %s", output, note)
    return manifest


def _prepare(files, output: Path, vocab: str | Path | None, settings: PrepareSettings) -> tuple[dict, bool]:
    """(manifest, whether this call wrote it: False when the output was already prepared)."""
    output.mkdir(parents=True, exist_ok=True)
    vocab_file = output / VOCAB_FILE
    new_vocab, key = vocab_changes(files, output, vocab, settings)
    if not new_vocab:
        manifest = finished(output, fingerprint_of(files, settings, sha256_file(vocab_file)))
        if manifest is not None:
            log.info("%s is already prepared from these inputs; nothing to do", output)
            return manifest, False
    # Before a vocab or a shard sees any input, and before anything in `output` is replaced.
    check_texts(files, settings.max_non_utf8_share, settings.max_line_chars)
    place_vocab(files, output, vocab, settings, new_vocab, key)
    words = read_vocab(vocab_file)
    vocab_sha = sha256_file(vocab_file)
    fingerprint = fingerprint_of(files, settings, vocab_sha)
    (output / MANIFEST).unlink(missing_ok=True)
    carry = _write_shards(files, output, words, settings, fingerprint)
    return write_manifest(files, output, settings, fingerprint, words, vocab_sha, carry), True


def _write_shards(files, output: Path, words: list[str], settings: PrepareSettings, fingerprint: str):
    """Tokenizes the inputs into shards after the complete ones of this fingerprint (all of them
    on a fresh start); returns the counts after the last kept document."""
    records = complete_shards(output, fingerprint)
    if not records:  # a fresh start: old shards of other inputs or settings must not linger
        for stale in output.glob("shard_*"):
            stale.unlink()
    start = tuple(records[-1]["end"]) if records else (0, 0)
    stats = Counter(records[-1]["totals"]) if records else Counter()
    writer = ShardWriter(output, words, settings, fingerprint, len(records), stats)
    # Enough workers for the chunks left, each with one tokenizer thread unless it is alone.
    left = sum(p.stat().st_size for p, _ in files[start[0]:]) - start[1]
    workers = worker_count(settings.workers, left, settings.batch_chars)
    args = (output / VOCAB_FILE, files, settings, settings.threads or (0 if workers == 1 else 1))
    non_utf8 = Counter()
    chunks = chunk_ranges(files, start, settings.batch_chars, settings.max_line_chars)
    with tokenized(chunks, workers, args) as parts:
        for (index, _, stop), (part, tail, replaced) in parts:
            writer.add(part, tail)
            non_utf8[index] += replaced
            if stop == files[index][0].stat().st_size and non_utf8[index]:
                log.warning("%s: %d line(s) had bytes that are not UTF-8; replaced by U+FFFD",
                            files[index][0], non_utf8[index])
    writer.flush()
    return writer.carry
