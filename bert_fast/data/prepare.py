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
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bert_fast.data.hf_tokenizer import wordpiece
from bert_fast.data.sentences import split_sentences
from bert_fast.data.shards import (
    ARRAYS,
    FORMAT_VERSION,
    SPECIAL_TOKENS,
    read_vocab,
    shard_name,
    special_ids,
    token_dtype,
)
from bert_fast.data.textcheck import check_text, to_line_end
from bert_fast.fileio import atomic_path, atomic_write_text, exclusive, sha256_file

log = logging.getLogger("bert_fast.data")
SUFFIXES = (".txt", ".jsonl", ".json")
# What each kept document carries into its shard's counts: its bytes, its empty sentences, and the
# documents dropped and lines skipped since the previous kept document.
COUNTS = ("bytes", "empty_sentences", "short_documents", "non_utf8_lines", "long_lines", "bad_json_lines")
ALWAYS_COUNTED = ("bytes", "empty_sentences")  # in a shard's counts even when 0


@dataclass(frozen=True)
class PrepareSettings:
    shard_tokens: int = 1 << 24
    max_line_chars: int = 100_000
    min_sentences: int = 2
    lowercase: bool = True
    vocab_size: int = 30522          # when a vocab is trained
    max_non_utf8_share: float = 0.1  # a file with a larger share of lines that are not UTF-8 is refused
    batch_chars: int = 1 << 20       # bytes of input per chunk (a worker's unit of work)
    threads: int = 0                 # tokenizer threads per worker (0: all cores with 1 worker, else 1)
    workers: int = 0                 # processes (0: all cores); neither changes the output

    def __post_init__(self):
        for name in ("threads", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("shard_tokens", "max_line_chars", "min_sentences", "vocab_size", "batch_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        share = self.max_non_utf8_share
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 <= share <= 1.0:
            raise ValueError(f"max_non_utf8_share must be a number in [0, 1], got {share!r}")
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


def _read_range(files, index: int, begin: int, stop: int, max_line_chars: int):
    """Yields (sentences, position after the document, (non_utf8_lines, long_lines, bad_json_lines)
    since the previous document) for the documents of file `index` of `files` [(path, kind)] that
    lie in bytes [begin, stop) (both at document boundaries); a last (None, None, skips) when
    lines were skipped after the last document."""
    path, kind = files[index]
    non_utf8 = long = bad_json = 0
    doc: list[str] = []
    with open(path, "rb") as f:
        f.seek(begin)
        offset = begin
        while offset < stop:
            line = f.readline(max_line_chars + 1)
            if not line:
                break
            start, offset = offset, offset + len(line)
            if len(line) > max_line_chars and not line.endswith(b"\n"):
                to_line_end(f, line)  # drop the rest without holding it
                offset = f.tell()
                long += 1
                log.info("%s: skipped a line over %d bytes at byte %d", path, max_line_chars, start)
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("utf-8", errors="replace")
                non_utf8 += 1
            if kind == "jsonl":
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                    body = value["text"] if isinstance(value, dict) else None
                    if not isinstance(body, str):
                        raise ValueError("no string 'text' field")
                except (ValueError, KeyError) as err:
                    bad_json += 1
                    log.info("%s: skipped a bad JSONL line at byte %d (%s)", path, start, err)
                    continue
                sentences = [s for part in body.splitlines() for s in split_sentences(part)]
                yield sentences, (index, offset), (non_utf8, long, bad_json)
                non_utf8 = long = bad_json = 0
                continue
            text = text.strip()
            if text:
                doc.append(text)
            elif doc:
                yield doc, (index, offset), (non_utf8, long, bad_json)
                doc, non_utf8, long, bad_json = [], 0, 0, 0
    if doc:  # the file ends without a blank line
        yield doc, (index + 1, 0), (non_utf8, long, bad_json)
    elif non_utf8 or long or bad_json:
        yield None, None, (non_utf8, long, bad_json)


def _chunks(files, start: tuple[int, int], chunk_bytes: int, max_line_chars: int):
    """(file index, begin, stop) of consecutive pieces of the inputs from `start`: a piece ends at
    the first document boundary (after a blank line in text, after any line in JSONL, as
    `_read_range` reads lines) at least `chunk_bytes` after its start, or at the end of its file."""
    for index in range(start[0], len(files)):
        path, kind = files[index]
        size = path.stat().st_size
        begin = start[1] if index == start[0] else 0
        with open(path, "rb") as f:
            while begin < size:
                f.seek(min(begin + chunk_bytes, size) - 1)
                to_line_end(f)
                while kind == "text":
                    line = f.readline(max_line_chars + 1)
                    if not line:
                        break
                    if len(line) > max_line_chars and not line.endswith(b"\n"):
                        to_line_end(f, line)
                    elif not line.decode("utf-8", errors="replace").strip():
                        break
                stop = f.tell()
                yield index, begin, stop
                begin = stop


def read_documents(files, max_line_chars: int):
    """Yields the documents (lists of sentences) of `files` [(path, kind)] in order."""
    for index, (path, _) in enumerate(files):
        for sentences, _, _ in _read_range(files, index, 0, path.stat().st_size, max_line_chars):
            if sentences is not None:
                yield sentences


def _output_settings(settings: PrepareSettings) -> dict:
    """The settings that decide the output (threads, workers and chunk size do not, nor the text
    check, which only refuses inputs)."""
    skip = ("threads", "workers", "batch_chars", "max_non_utf8_share")
    return {k: v for k, v in asdict(settings).items() if k not in skip}


def _fingerprint(files, settings: PrepareSettings, vocab_sha: str) -> str:
    import hashlib

    stat = [(str(p), kind, p.stat().st_size, p.stat().st_mtime_ns) for p, kind in files]
    text = json.dumps([FORMAT_VERSION, stat, _output_settings(settings), vocab_sha], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# A pair of pieces seen fewer times than this is never merged into a new word.
MIN_FREQUENCY = 2


def alphabet_limit(vocab_size: int) -> int:
    """How many characters a trained vocab keeps (the most frequent; the others become [UNK]).
    `tokenizers` puts every kept character and a `##` form of each into the vocab before any merge,
    even past vocab_size (its default of 1000 characters gave 1427 words for vocab_size=1000 on
    an input with many distinct characters): keep no more than leave room for both forms."""
    return min(1000, (vocab_size - len(SPECIAL_TOKENS)) // 2)


def _vocab_key(files, settings: PrepareSettings) -> str:
    """What a trained vocab depends on: the inputs and the settings `train_vocab` uses."""
    import hashlib

    stat = [(str(p), kind, p.stat().st_size, p.stat().st_mtime_ns) for p, kind in files]
    # The limit only where it is not the 1000 every vocab was trained with before it was set, so
    # those vocabs (the cached embedded corpus's among them) are not trained again.
    limit = alphabet_limit(settings.vocab_size)
    text = json.dumps([stat, settings.vocab_size, settings.lowercase, settings.max_line_chars]
                      + ([limit] if limit != 1000 else []))
    return hashlib.sha256(text.encode()).hexdigest()


def train_vocab(files, output: Path, settings: PrepareSettings) -> Path:
    """A WordPiece vocab trained on the inputs with `tokenizers` (streamed), saved as vocab.txt."""
    from tokenizers import BertWordPieceTokenizer

    def texts():
        for sentences in read_documents(files, settings.max_line_chars):
            yield from sentences

    tokenizer = BertWordPieceTokenizer(lowercase=settings.lowercase)
    limit = alphabet_limit(settings.vocab_size)
    tokenizer.train_from_iterator(texts(), vocab_size=settings.vocab_size, min_frequency=MIN_FREQUENCY,
                                  limit_alphabet=limit, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    words = [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    if sum(len(w) == 1 for w in words) == limit:
        log.info("the vocab keeps the input's %d most frequent characters (vocab_size=%d); any others "
                 "become [UNK]", limit, settings.vocab_size)
    path = output / "vocab.txt"
    with atomic_path(path) as tmp:
        tmp.write_text("".join(w + "\n" for w in words), encoding="utf-8")
    return path


def short_vocab(asked: int | None, size: int) -> str | None:
    """Why a trained vocab has fewer words than asked (None when it has them all, or was given)."""
    if asked is None or size >= asked:
        return None
    return (f"the vocab trained on the input has {size} words, not the {asked} asked (vocab_size): "
            f"training stops when no pair of adjacent pieces occurs at least {MIN_FREQUENCY} times in "
            "the input, so this input is too small for more words; the model is sized to the vocab")


class _Tokenizer:
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


@dataclass
class _Part:
    """Kept documents of a chunk, tokenized, in input order."""
    tokens: np.ndarray         # the vocab's dtype [T]
    lengths: np.ndarray        # int64 [S], tokens per kept sentence
    doc_sentences: np.ndarray  # int64 [D], kept sentences per document
    doc_tokens: np.ndarray     # int64 [D]
    ends: np.ndarray           # int64 [D, 2], input position (file index, byte) after each document
    counts: np.ndarray         # int64 [D, len(COUNTS)], what each document carries into its shard

    def split(self, n: int) -> tuple[_Part, _Part]:
        """(the first n documents, the rest)."""
        s, t = int(self.doc_sentences[:n].sum()), int(self.doc_tokens[:n].sum())
        return (_Part(self.tokens[:t], self.lengths[:s], self.doc_sentences[:n], self.doc_tokens[:n],
                      self.ends[:n], self.counts[:n]),
                _Part(self.tokens[t:], self.lengths[s:], self.doc_sentences[n:], self.doc_tokens[n:],
                      self.ends[n:], self.counts[n:]))


class _ChunkTokenizer:
    """A worker's job: one chunk of the input -> (its kept documents as a _Part, the counts after
    its last kept document, the number of non-UTF-8 lines)."""

    def __init__(self, vocab: Path, files, settings: PrepareSettings, threads: int):
        self.tok = _Tokenizer(vocab, settings.lowercase, threads)
        self.files, self.settings = files, settings

    def __call__(self, chunk: tuple[int, int, int]) -> tuple[_Part, np.ndarray, int]:
        docs, ends, skips, tail = [], [], [], np.zeros(len(COUNTS), dtype=np.int64)
        for sentences, end, skipped in _read_range(self.files, *chunk, self.settings.max_line_chars):
            if sentences is None:
                tail[3:] += skipped
            else:
                docs.append(sentences)
                ends.append(end)
                skips.append(skipped)
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
        part = _Part(tokens=ids[np.repeat(keep_sentence, lengths)], lengths=lengths[keep_sentence],
                     doc_sentences=kept[keep], doc_tokens=doc_tokens[keep],
                     ends=np.array(ends, dtype=np.int64).reshape(-1, 2)[keep], counts=counts[:-1])
        return part, tail, non_utf8


_WORKER: _ChunkTokenizer | None = None  # in a pool process


def _start_worker(*args) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    _WORKER = _ChunkTokenizer(*args)


def _work(chunk):
    return _WORKER(chunk)


@contextlib.contextmanager
def _tokenized(chunks, workers: int, args):
    """An iterator over (chunk, _ChunkTokenizer(*args)(chunk)) in input order: in this process, or
    from a pool of `workers` processes with at most two chunks per worker in flight (so results
    never pile up, whatever the corpus size)."""
    if workers == 1:
        job = _ChunkTokenizer(*args)
        yield ((chunk, job(chunk)) for chunk in chunks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)  # fork: no re-imports
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=args)

    def result(chunk, future):
        try:
            return chunk, future.result()
        except BrokenProcessPool as err:
            raise RuntimeError("a prepare worker process died (killed for lack of memory?); the complete "
                               "shards are kept: run prepare again to resume") from err

    def results():
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_work, chunk)))
            if len(pending) >= 2 * workers:
                yield result(*pending.popleft())
        while pending:
            yield result(*pending.popleft())

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ShardWriter:
    """Collects tokenized documents and writes a shard each time `shard_tokens` are reached."""

    def __init__(self, output: Path, words: list[str], settings: PrepareSettings, fingerprint: str,
                 first_shard: int, stats: Counter):
        self.output, self.settings, self.fingerprint = output, settings, fingerprint
        self.word_start = np.array([not w.startswith("##") for w in words], dtype=np.uint8)
        self.next_shard, self.stats = first_shard, stats  # stats: totals up to the last written shard
        self.parts: list[_Part] = []
        self.tokens = 0
        self.carry = np.zeros(len(COUNTS), dtype=np.int64)  # counts since the last kept document

    def add(self, part: _Part, tail: np.ndarray) -> None:
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


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
        if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
            return records
        for entry in record["files"].values():
            file = output / entry["file"]
            if not file.is_file() or sha256_file(file) != entry["sha256"]:
                log.warning("%s does not match its record; preparing from shard %d again", file, len(records))
                return records
        records.append(record)


def prepare(inputs, output: str | Path, vocab: str | Path | None = None, fmt: str = "auto",
            settings: PrepareSettings | None = None) -> dict:
    """Prepares `inputs` (files or folders) into `output`; returns the manifest (also written).
    One process at a time per output folder: the others wait, then find it prepared."""
    files = _input_files(inputs, fmt)  # bad inputs are refused before the output folder is made
    settings = settings or PrepareSettings()
    with exclusive(Path(output) / ".prepare.lock"):
        manifest, fresh = _prepare(files, Path(output), vocab, settings)
    trained = (Path(output) / "vocab.train.json").is_file()
    note = short_vocab(settings.vocab_size if trained else None, manifest["vocab"]["size"])
    if note:  # a warning when the vocab is trained; a corpus found prepared only repeats it as info
        log.log(logging.WARNING if fresh else logging.INFO, "%s: %s", output, note)
    return manifest


def _check_texts(files, settings: PrepareSettings) -> None:
    """Refuses the first input file that is not text (textcheck.py), before any is read for use."""
    for path, _ in files:
        check_text(path, settings.max_non_utf8_share, settings.max_line_chars)


def _finished(output: Path, fingerprint: str) -> dict | None:
    """The manifest of `output` when it is complete and prepared with this fingerprint."""
    try:
        manifest = json.loads((output / "manifest.json").read_text())
    except (OSError, ValueError):  # absent, not ours, or damaged: prepared again
        return None
    if (isinstance(manifest, dict) and manifest.get("fingerprint") == fingerprint
            and len(_complete_shards(output, fingerprint)) == len(manifest["shards"])):
        return manifest
    return None


def _prepare(files, output: Path, vocab: str | Path | None, settings: PrepareSettings) -> tuple[dict, bool]:
    """(manifest, whether this call wrote it: False when the output was already prepared)."""
    output.mkdir(parents=True, exist_ok=True)
    vocab_file = output / "vocab.txt"
    trained = output / "vocab.train.json"  # what a trained vocab.txt was trained from
    if vocab is not None:
        read_vocab(Path(vocab))
        new_vocab = not vocab_file.is_file() or sha256_file(vocab_file) != sha256_file(Path(vocab))
    else:
        # A vocab trained on other inputs or with another vocab_size/lowercase is trained again.
        key = _vocab_key(files, settings)
        new_vocab = not vocab_file.is_file() or (trained.is_file() and trained.read_text() != key)
    if not new_vocab:
        manifest = _finished(output, _fingerprint(files, settings, sha256_file(vocab_file)))
        if manifest is not None:
            log.info("%s is already prepared from these inputs; nothing to do", output)
            return manifest, False
    # Before a vocab or a shard sees any input, and before anything in `output` is replaced.
    _check_texts(files, settings)
    if vocab is not None:
        if new_vocab:
            with atomic_path(vocab_file) as tmp:
                shutil.copyfile(vocab, tmp)
        trained.unlink(missing_ok=True)
    elif new_vocab:
        trained.unlink(missing_ok=True)
        train_vocab(files, output, settings)
        atomic_write_text(trained, key)
    words = read_vocab(vocab_file)
    vocab_sha = sha256_file(vocab_file)
    fingerprint = _fingerprint(files, settings, vocab_sha)
    manifest_path = output / "manifest.json"
    manifest_path.unlink(missing_ok=True)

    records = _complete_shards(output, fingerprint)
    if not records:  # a fresh start: old shards of other inputs or settings must not linger
        for stale in output.glob("shard_*"):
            stale.unlink()
    start = tuple(records[-1]["end"]) if records else (0, 0)
    stats = Counter(records[-1]["totals"]) if records else Counter()
    writer = _ShardWriter(output, words, settings, fingerprint, len(records), stats)
    # Enough workers for the chunks left, each with one tokenizer thread unless it is alone.
    left = sum(p.stat().st_size for p, _ in files[start[0]:]) - start[1]
    workers = max(1, min(settings.workers or _cores(), -(-left // settings.batch_chars)))
    args = (vocab_file, files, settings, settings.threads or (0 if workers == 1 else 1))
    non_utf8 = Counter()
    chunks = _chunks(files, start, settings.batch_chars, settings.max_line_chars)
    with _tokenized(chunks, workers, args) as parts:
        for (index, _, stop), (part, tail, replaced) in parts:
            writer.add(part, tail)
            non_utf8[index] += replaced
            if stop == files[index][0].stat().st_size and non_utf8[index]:
                log.warning("%s: %d line(s) had bytes that are not UTF-8; replaced by U+FFFD",
                            files[index][0], non_utf8[index])
    writer.flush()
    records = _complete_shards(output, fingerprint)
    totals = Counter(records[-1]["totals"]) if records else Counter()
    totals.update({k: int(v) for k, v in zip(COUNTS, writer.carry)})
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
        "vocab": {"file": vocab_file.name, "sha256": vocab_sha, "size": len(words), **special_ids(words),
                  **({"requested": settings.vocab_size} if trained.is_file() else {})},
        "token_dtype": str(token_dtype(len(words))),
        "totals": {k: totals[k] for k in ("documents", "sentences", "tokens", "bytes")},
        "skipped": skipped,
        "shards": [{"name": r["name"], **{k: r["counts"][k] for k in ("documents", "sentences", "tokens")},
                    "files": r["files"]} for r in records],
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest, True
