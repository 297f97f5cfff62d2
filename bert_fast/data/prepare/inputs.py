"""prepare's inputs: finding the files, refusing those that are not text, cutting them into chunks
at document boundaries, and reading a chunk's documents (text or JSONL) with its skipped lines."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from bert_fast.data.sentences import split_sentences
from bert_fast.data.textcheck import check_text, to_line_end

log = logging.getLogger("bert_fast.data")
SUFFIXES = (".txt", ".jsonl", ".json")


def input_files(inputs, fmt: str) -> list[tuple[Path, str]]:
    """[(absolute path, "text" or "jsonl")] of `inputs` (files, or folders searched for SUFFIXES)."""
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


def file_stats(files) -> list[tuple[str, str, int, int]]:
    """(path, kind, size, mtime) of each input: what tells a changed input from the one used before."""
    return [(str(p), kind, p.stat().st_size, p.stat().st_mtime_ns) for p, kind in files]


def check_texts(files, max_non_utf8_share: float, max_line_chars: int) -> None:
    """Refuses the first input file that is not text (textcheck.py), before any is read for use."""
    for path, _ in files:
        check_text(path, max_non_utf8_share, max_line_chars)


def read_range(files, index: int, begin: int, stop: int, max_line_chars: int):
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
                    sentences = _jsonl_sentences(text)
                except (ValueError, KeyError) as err:
                    bad_json += 1
                    log.info("%s: skipped a bad JSONL line at byte %d (%s)", path, start, err)
                    continue
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


def _jsonl_sentences(line: str) -> list[str]:
    """The sentences of a JSONL line's `text` field, cut at line breaks and sentence ends."""
    value = json.loads(line)
    body = value["text"] if isinstance(value, dict) else None
    if not isinstance(body, str):
        raise ValueError("no string 'text' field")
    return [s for part in body.splitlines() for s in split_sentences(part)]


def chunk_ranges(files, start: tuple[int, int], chunk_bytes: int, max_line_chars: int):
    """(file index, begin, stop) of consecutive pieces of the inputs from `start`: a piece ends at
    the first document boundary (after a blank line in text, after any line in JSONL, as
    `read_range` reads lines) at least `chunk_bytes` after its start, or at the end of its file."""
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
        for sentences, _, _ in read_range(files, index, 0, path.stat().st_size, max_line_chars):
            if sentences is not None:
                yield sentences
