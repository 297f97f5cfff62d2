"""Whether an input file is text, decided before any of it reaches a vocab or a shard.

`prepare` refuses a file that holds a NUL byte (binary data, or UTF-16 text) or in which the share
of lines that are not UTF-8 exceeds `max_non_utf8_share` (random bytes, or text in another
encoding): replacing their bytes by U+FFFD would add garbage sentences to the corpus (a line with
a NUL byte counts as not UTF-8 in the share). A few bad lines in a real file pass, and prepare
replaces and counts them. A line over `max_line_chars` bytes is never bad: prepare drops it unread.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path


class NotTextError(ValueError):
    """An input file that is not UTF-8 text."""


@dataclass(frozen=True)
class TextScan:
    lines: int                # lines of the file
    bad_lines: int            # of those, lines with a NUL byte or bytes that are not UTF-8
    first_nul: int | None     # byte offset of the first NUL byte, if any

    @property
    def bad_share(self) -> float:
        return self.bad_lines / self.lines if self.lines else 0.0


def to_line_end(f, line: bytes = b"") -> None:
    """Reads on to the end of the line that `line` began (from the current position when empty),
    1 MiB at a time, so an over-long line is never held in memory."""
    while not line.endswith(b"\n"):
        line = f.readline(1 << 20)
        if not line:
            return


def _clean_lines(path: Path) -> int | None:
    """The number of lines of `path` if all of it is UTF-8 without a NUL byte, else None. Reads
    1 MiB blocks (several times faster than line by line): a newline never occurs inside a UTF-8
    sequence, so the whole file decodes exactly when every line does."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if b"\0" in block:
                return None
            try:
                decoder.decode(block)
            except UnicodeDecodeError:
                return None
            lines += block.count(b"\n")
            last = block[-1:]
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return None
    return lines + (last != b"\n")


def scan_text(path: Path, max_line_chars: int) -> TextScan:
    """Counts the lines of `path` and those that are not text, and finds its first NUL byte."""
    lines = _clean_lines(path)
    if lines is not None:
        return TextScan(lines, 0, None)
    lines = bad = 0
    first_nul = None
    with open(path, "rb") as f:
        offset = 0
        while line := f.readline(max_line_chars + 1):
            start, offset = offset, offset + len(line)
            lines += 1
            if len(line) > max_line_chars and not line.endswith(b"\n"):
                to_line_end(f, line)
                offset = f.tell()
                continue
            nul = line.find(b"\0")
            if nul >= 0:
                bad += 1
                first_nul = start + nul if first_nul is None else first_nul
                continue
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
    return TextScan(lines, bad, first_nul)


def check_text(path: Path, max_non_utf8_share: float, max_line_chars: int) -> TextScan:
    """The scan of `path`; raises NotTextError naming the file and the share of its lines that are
    not text when it holds a NUL byte or that share exceeds `max_non_utf8_share`."""
    scan = scan_text(path, max_line_chars)
    share = f"{scan.bad_share:.1%} of its lines ({scan.bad_lines} of {scan.lines})"
    if scan.first_nul is not None:
        raise NotTextError(f"input file {path} is not text: it holds NUL bytes (the first at byte "
                           f"{scan.first_nul}; binary data, or UTF-16 text), and {share} are not UTF-8 text")
    if scan.bad_share > max_non_utf8_share:
        raise NotTextError(f"input file {path} is not UTF-8 text: {share} have bytes that are not UTF-8, "
                           f"more than max_non_utf8_share={max_non_utf8_share:g} allows (random bytes, or "
                           "text in another encoding: convert it to UTF-8)")
    return scan
