"""bert_fast.data.textcheck: the scan that decides whether prepare takes a file, against a plain
reference (split at newlines, decode each line strictly), on its block path (a clean file) and
its line path (a file with a bad line)."""

import numpy as np
import pytest

from bert_fast.data.textcheck import NotTextError, check_text, scan_text

LIMIT = 40  # max_line_chars
PIECES = [b"plain ascii words", "caf\u00e9 cr\u00e8me \u4e2d\u6587".encode(), b"bad \xff\xfe bytes", b"nul \0 byte",
          b"x" * (LIMIT + 1), b"y" * LIMIT, b"long \xff " + b"z" * LIMIT, b"cut \xe4\xb8", b"crlf line\r", b""]


def reference(data: bytes) -> tuple[int, int, int | None]:
    """(lines, lines of at most LIMIT bytes with a NUL or bytes that are not UTF-8, offset of the
    first NUL in such a line): prepare drops longer lines unread."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the file ends with a newline, or is empty
    bad, first_nul, offset = 0, None, 0
    for line in lines:
        if len(line) <= LIMIT:
            try:
                line.decode("utf-8")
                broken = False
            except UnicodeDecodeError:
                broken = True
            if b"\0" in line and first_nul is None:
                first_nul = offset + line.index(b"\0")
            bad += broken or b"\0" in line
        offset += len(line) + 1
    return len(lines), bad, first_nul


def test_scan_matches_the_reference_on_random_files(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "f.txt"
    paths = {"block": 0, "line": 0}
    for _ in range(300):
        chosen = rng.integers(0, len(PIECES), rng.integers(0, 8))
        allowed = rng.random(len(PIECES)) < 0.5  # clean pieces always: some files take the block path
        data = b"\n".join(PIECES[i] for i in chosen if allowed[i] or i in (0, 1, 5, 9))
        data += b"\n" if rng.random() < 0.5 else b""
        path.write_bytes(data)
        scan = scan_text(path, LIMIT)
        assert (scan.lines, scan.bad_lines, scan.first_nul) == reference(data), data
        clean = b"\0" not in data and _decodes(data)
        paths["block" if clean else "line"] += 1
    assert min(paths.values()) > 50, paths


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_block_boundaries_do_not_split_characters(tmp_path):
    """A 3-byte character across the 1 MiB block boundary is text; one cut by the end of the file
    is not."""
    data = b"a" * ((1 << 20) - 1) + "\u4e2d".encode() + b" end\n"
    (tmp_path / "f.txt").write_bytes(data)
    scan = scan_text(tmp_path / "f.txt", 1 << 22)
    assert (scan.lines, scan.bad_lines, scan.first_nul) == (1, 0, None)
    (tmp_path / "cut.txt").write_bytes(b"good line\nlast \xe4\xb8")
    scan = scan_text(tmp_path / "cut.txt", LIMIT)
    assert (scan.lines, scan.bad_lines) == (2, 1)


def test_check_names_the_file_and_the_share(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok one\nok two\ncaf\xe9\nok three\n")
    assert check_text(path, 0.25, LIMIT).bad_share == 0.25
    with pytest.raises(NotTextError, match=r"latin1.txt is not UTF-8 text: 25.0% of its lines \(1 of 4\)"):
        check_text(path, 0.2, LIMIT)
    path.write_bytes(b"ok\n" + b"\xff" * (LIMIT + 1) + b"\n")  # only a line prepare drops is bad
    assert check_text(path, 0.0, LIMIT).bad_lines == 0
    path.write_bytes(b"ok\nnul\0\n")
    with pytest.raises(NotTextError, match=r"holds NUL bytes \(the first at byte 6;.*50.0% of its lines \(1 of 2\)"):
        check_text(path, 1.0, LIMIT)
