"""`bert-fast data prepare`: raw text -> WordPiece ids -> shards + manifest.json (see shards.py).

Input formats (by extension, or `fmt`):
- text: one sentence per line, a blank line between documents (the original BERT format);
- JSONL (`.jsonl`, `.json`): one document per line, its `text` field cut into sentences at line
  breaks and by `corpus.split_sentences` (., ! or ? then whitespace then a capital, digit or quote).

It streams: inputs are read line by line (a line longer than `max_line_chars` bytes is skipped
without being held in memory), tokenized in batches of about `batch_chars` characters (ASCII
sentences by the C++ WordPiece in csrc/data/wordpiece.cpp, which gives the `tokenizers` library's
ids ~20x faster; the others by `tokenizers` itself; both on all cores), and written as shards of
about `shard_tokens` tokens, so memory is bounded by the batch and shard sizes, not the corpus.
Skips are counted, logged, and recorded in the manifest: non-UTF-8 bytes (replaced by U+FFFD, with
a warning naming the file), over-long lines, bad JSON lines, sentences with no tokens, documents
with fewer than `min_sentences` sentences. Re-running with the same inputs and settings keeps
every complete shard whose checksums hold and resumes after the last one; a finished corpus is
left as it is.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bert_fast.data.corpus import split_sentences
from bert_fast.data.shards import (
    ARRAYS,
    FORMAT_VERSION,
    SPECIAL_TOKENS,
    read_vocab,
    sha256_file,
    shard_name,
    special_ids,
    token_dtype,
)
from bert_fast.fileio import atomic_path, atomic_write_text

log = logging.getLogger("bert_fast.data")
SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass(frozen=True)
class PrepareSettings:
    shard_tokens: int = 1 << 24
    max_line_chars: int = 100_000
    min_sentences: int = 2
    lowercase: bool = True
    vocab_size: int = 30522          # when a vocab is trained
    batch_chars: int = 1 << 20
    threads: int = 0                 # tokenizer threads (0: all cores); does not change the output

    def __post_init__(self):
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {self.threads!r}")
        for name in ("shard_tokens", "max_line_chars", "min_sentences", "vocab_size", "batch_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vocab_size < len(SPECIAL_TOKENS) + 100:
            raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 100}, got {self.vocab_size}")


def _input_files(inputs, fmt: str) -> list[tuple[Path, str]]:
    if fmt not in ("auto", "text", "jsonl"):
        raise ValueError(f"fmt must be 'auto', 'text' or 'jsonl', got {fmt!r}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"input folder {path} holds no .txt, .jsonl or .json files")
        elif not path.exists():
            raise FileNotFoundError(f"input file {path} does not exist")
        else:
            found = [path]
        for p in found:
            if not os.access(p, os.R_OK):
                raise PermissionError(f"input file {p} is not readable")
            kind = fmt if fmt != "auto" else ("jsonl" if p.suffix in (".jsonl", ".json") else "text")
            files.append((p.resolve(), kind))
    if not files:
        raise ValueError("no input files given")
    return files


def read_documents(files, max_line_chars: int, start=(0, 0)):
    """Yields (sentences, position after the document, skip counts since the previous document)
    from `files` [(path, kind)], starting at `start` = (file index, byte offset)."""
    counts = Counter()
    for index in range(start[0], len(files)):
        path, kind = files[index]
        replaced = 0
        with open(path, "rb") as f:
            f.seek(start[1] if index == start[0] else 0)
            doc: list[str] = []
            while True:
                offset = f.tell()
                line = f.readline(max_line_chars + 1)
                if not line:
                    break
                if len(line) > max_line_chars and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # drop the rest without holding it
                        line = f.readline(1 << 20)
                    counts["long_lines"] += 1
                    log.info("%s: skipped a line over %d bytes at byte %d", path, max_line_chars, offset)
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    text = line.decode("utf-8", errors="replace")
                    replaced += 1
                    counts["non_utf8_lines"] += 1
                if kind == "jsonl":
                    if not text.strip():
                        continue
                    try:
                        value = json.loads(text)
                        body = value["text"] if isinstance(value, dict) else None
                        if not isinstance(body, str):
                            raise ValueError("no string 'text' field")
                    except (ValueError, KeyError) as err:
                        counts["bad_json_lines"] += 1
                        log.info("%s: skipped a bad JSONL line at byte %d (%s)", path, offset, err)
                        continue
                    sentences = [s for part in body.splitlines() for s in split_sentences(part)]
                    yield sentences, (index, f.tell()), counts
                    counts = Counter()
                    continue
                text = text.strip()
                if text:
                    doc.append(text)
                elif doc:
                    yield doc, (index, f.tell()), counts
                    doc, counts = [], Counter()
            if doc:
                yield doc, (index + 1, 0), counts
                counts = Counter()
        if replaced:
            warnings.warn(f"{path}: {replaced} line(s) had bytes that are not UTF-8; replaced by U+FFFD",
                          stacklevel=2)
    if counts:
        yield None, (len(files), 0), counts


def _output_settings(settings: PrepareSettings) -> dict:
    """The settings that decide the output (thread count and batch size do not)."""
    return {k: v for k, v in asdict(settings).items() if k not in ("threads", "batch_chars")}


def _fingerprint(files, settings: PrepareSettings, vocab_sha: str) -> str:
    import hashlib

    stat = [(str(p), kind, p.stat().st_size, p.stat().st_mtime_ns) for p, kind in files]
    text = json.dumps([FORMAT_VERSION, stat, _output_settings(settings), vocab_sha], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def train_vocab(files, output: Path, settings: PrepareSettings) -> Path:
    """A WordPiece vocab trained on the inputs with `tokenizers` (streamed), saved as vocab.txt."""
    from tokenizers import BertWordPieceTokenizer

    def texts():
        for sentences, _, _ in read_documents(files, settings.max_line_chars):
            if sentences:
                yield from sentences

    tokenizer = BertWordPieceTokenizer(lowercase=settings.lowercase)
    tokenizer.train_from_iterator(texts(), vocab_size=settings.vocab_size, min_frequency=2,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    path = output / "vocab.txt"
    with atomic_path(path) as tmp:
        words = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        tmp.write_text("".join(w + "\n" for w, _ in words), encoding="utf-8")
    return path


class _Tokenizer:
    """WordPiece ids per sentence: ASCII sentences through the C++ fast path (bert_fast._data,
    identical to `tokenizers` on ASCII, several times faster), the rest through `tokenizers`."""

    def __init__(self, vocab: Path, lowercase: bool, threads: int = 0):
        from tokenizers import BertWordPieceTokenizer

        from bert_fast.data.builder import _data

        self.words = read_vocab(vocab)
        self.tokenizer = BertWordPieceTokenizer(str(vocab), lowercase=lowercase)
        unk = special_ids(self.words)["unk_id"]
        self.fast = None if _data is None else _data.WordPiece(self.words, lowercase, unk)
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


class _ShardWriter:
    """Collects tokenized documents and writes a shard each time `shard_tokens` are reached."""

    def __init__(self, output: Path, tokenizer: _Tokenizer, settings: PrepareSettings, fingerprint: str,
                 first_shard: int, stats: Counter):
        self.output, self.tok, self.settings, self.fingerprint = output, tokenizer, settings, fingerprint
        self.next_shard, self.stats = first_shard, stats  # stats: totals up to the last written shard
        self.docs: list[tuple] = []  # (ids, sentence lengths, position, counts) per kept document
        self.tokens = 0
        self.carry = Counter()       # counts of dropped documents, credited to the next kept one

    def add_batch(self, batch: list[tuple]) -> None:
        sentences = [s for doc, _, _ in batch for s in doc]
        ids, lengths = self.tok(sentences)
        ends = np.cumsum(lengths)
        s0 = 0
        for doc, position, counts in batch:
            s1 = s0 + len(doc)
            lens = lengths[s0:s1]
            t0 = int(ends[s0 - 1]) if s0 else 0
            doc_ids = ids[t0:t0 + int(lens.sum())]
            s0 = s1
            self.carry.update(counts)
            self.carry["bytes"] += sum(len(s.encode()) + 1 for s in doc)
            kept = lens[lens > 0]
            self.carry["empty_sentences"] += len(lens) - len(kept)
            if len(kept) < self.settings.min_sentences:
                self.carry["short_documents"] += 1
                continue
            self.docs.append((doc_ids, kept, position, self.carry))
            self.carry = Counter()
            self.tokens += len(doc_ids)
            if self.tokens >= self.settings.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        docs, self.docs, self.tokens = self.docs, [], 0
        tokens = np.concatenate([d[0] for d in docs])
        lengths = np.concatenate([d[1] for d in docs])
        arrays = {
            "tokens": tokens,
            "word_starts": self.tok.word_start[tokens],
            "sentences": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "documents": np.concatenate([[0], np.cumsum([len(d[1]) for d in docs])]).astype(np.int64),
        }
        counts = Counter()
        for d in docs:
            counts.update(d[3])
        counts.update(documents=len(docs), sentences=len(lengths), tokens=len(tokens))
        name = shard_name(self.next_shard)
        files = {}
        for key in ARRAYS:
            path = self.output / f"{name}.{key}.npy"
            _write_array(path, arrays[key])
            files[key] = {"file": path.name, "sha256": sha256_file(path)}
        self.stats.update(counts)
        record = {"name": name, "fingerprint": self.fingerprint, "end": list(docs[-1][2]),
                  "counts": dict(sorted(counts.items())), "totals": dict(sorted(self.stats.items())),
                  "files": files}
        atomic_write_text(self.output / f"{name}.json", json.dumps(record, indent=1))
        log.info("wrote %s: %d documents, %d tokens", name, len(docs), len(tokens))
        self.next_shard += 1


def _write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _complete_shards(output: Path, fingerprint: str) -> list[dict]:
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
        if record.get("fingerprint") != fingerprint:
            return records
        for entry in record["files"].values():
            file = output / entry["file"]
            if not file.is_file() or sha256_file(file) != entry["sha256"]:
                log.warning("%s does not match its record; preparing from shard %d again", file, len(records))
                return records
        records.append(record)


def prepare(inputs, output: str | Path, vocab: str | Path | None = None, fmt: str = "auto",
            settings: PrepareSettings | None = None) -> dict:
    """Prepares `inputs` (files or folders) into `output`; returns the manifest (also written)."""
    settings = settings or PrepareSettings()
    files = _input_files(inputs, fmt)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    vocab_file = output / "vocab.txt"
    if vocab is not None:
        words = read_vocab(Path(vocab))
        if not vocab_file.is_file() or sha256_file(vocab_file) != sha256_file(Path(vocab)):
            with atomic_path(vocab_file) as tmp:
                shutil.copyfile(vocab, tmp)
    elif not vocab_file.is_file():
        train_vocab(files, output, settings)
    words = read_vocab(vocab_file)
    vocab_sha = sha256_file(vocab_file)
    fingerprint = _fingerprint(files, settings, vocab_sha)

    manifest_path = output / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint and len(_complete_shards(output, fingerprint)) == len(
                manifest["shards"]):
            log.info("%s is already prepared from these inputs; nothing to do", output)
            return manifest
        manifest_path.unlink()

    records = _complete_shards(output, fingerprint)
    if not records:  # a fresh start: old shards of other inputs or settings must not linger
        for stale in output.glob("shard_*"):
            stale.unlink()
    start = tuple(records[-1]["end"]) if records else (0, 0)
    stats = Counter(records[-1]["totals"]) if records else Counter()
    tokenizer = _Tokenizer(vocab_file, settings.lowercase, settings.threads)
    writer = _ShardWriter(output, tokenizer, settings, fingerprint, len(records), stats)
    batch, chars = [], 0
    for sentences, position, counts in read_documents(files, settings.max_line_chars, start):
        if sentences is None:
            writer.carry.update(counts)
            continue
        batch.append((sentences, position, counts))
        chars += sum(map(len, sentences))
        if chars >= settings.batch_chars:
            writer.add_batch(batch)
            batch, chars = [], 0
    if batch:
        writer.add_batch(batch)
    writer.flush()
    records = _complete_shards(output, fingerprint)
    totals = Counter(records[-1]["totals"]) if records else Counter()
    totals.update(writer.carry)
    if not records:
        raise ValueError(f"no documents left in {[str(p) for p, _ in files]}: every document was empty or "
                         f"had fewer than {settings.min_sentences} sentences (skips: {dict(totals)})")
    skipped = {k: totals[k] for k in ("non_utf8_lines", "long_lines", "bad_json_lines", "empty_sentences",
                                      "short_documents") if totals[k]}
    if skipped:
        log.warning("prepare skipped or repaired: %s", ", ".join(f"{k}={v}" for k, v in skipped.items()))
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "inputs": [{"file": str(p), "format": kind, "bytes": p.stat().st_size} for p, kind in files],
        "settings": _output_settings(settings),
        "vocab": {"file": vocab_file.name, "sha256": vocab_sha, "size": len(words), **special_ids(words)},
        "token_dtype": str(tokenizer.dtype),
        "totals": {k: totals[k] for k in ("documents", "sentences", "tokens", "bytes")},
        "skipped": skipped,
        "shards": [{"name": r["name"], **{k: r["counts"][k] for k in ("documents", "sentences", "tokens")},
                    "files": r["files"]} for r in records],
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest
