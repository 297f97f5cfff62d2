"""`prepare`: text and JSONL -> shards that match an independent tokenization, streaming memory,
idempotent and crash-safe re-runs, and every bad input named or counted."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import text_documents, write_text, write_vocab
from tokenizers import BertWordPieceTokenizer

from bert_fast.data.builder import native_available
from bert_fast.data.prepare import PrepareSettings, prepare, writer
from bert_fast.data.sentences import split_sentences
from bert_fast.data.shards import PreparedCorpus
from bert_fast.data.textcheck import NotTextError
from bert_fast.fileio import atomic_path

SMALL = PrepareSettings(shard_tokens=1000, batch_chars=4096, workers=2)  # a pool, whatever the cores


@pytest.fixture
def vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    write_vocab(path)
    return path


def all_shards(corpus: PreparedCorpus):
    """(documents as lists of sentences as token-id lists, word starts) over every shard."""
    docs, starts = [], []
    for i in range(corpus.num_shards):
        s = corpus.shard(i)
        for d in range(len(s.documents) - 1):
            doc = []
            for j in range(s.documents[d], s.documents[d + 1]):
                doc.append(s.tokens[s.sentences[j]:s.sentences[j + 1]].tolist())
                starts.append(s.word_starts[s.sentences[j]:s.sentences[j + 1]])
            docs.append(doc)
    return docs, np.concatenate(starts)


def test_text_round_trip_matches_tokenizers(tmp_path, vocab):
    documents = text_documents(200, seed=1) + [["Zebra quux unknownword here.", "Second sentence too."]]
    write_text(tmp_path / "a.txt", documents[:120])
    write_text(tmp_path / "b.txt", documents[120:])
    manifest = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", vocab=vocab, settings=SMALL)
    corpus = PreparedCorpus(tmp_path / "out", vocab=vocab)
    assert corpus.num_shards == len(manifest["shards"]) > 3
    assert all(s["tokens"] >= SMALL.shard_tokens for s in manifest["shards"][:-1])
    tokenizer = BertWordPieceTokenizer(str(vocab), lowercase=True)
    expected = [[tokenizer.encode(s, add_special_tokens=False).ids for s in doc] for doc in documents]
    docs, starts = all_shards(corpus)
    assert docs == expected
    words = corpus.words
    flat = np.concatenate([np.array(s, dtype=np.int64) for d in docs for s in d])
    assert np.array_equal(starts, [not words[t].startswith("##") for t in flat])
    assert manifest["totals"]["documents"] == len(documents)
    assert manifest["totals"]["sentences"] == sum(map(len, documents))
    assert manifest["totals"]["tokens"] == len(flat) and manifest["token_dtype"] == "uint16"
    assert manifest["vocab"]["cls_id"] == 2 and manifest["vocab"]["size"] == len(words)


def test_jsonl_splits_sentences_by_rule(tmp_path, vocab):
    records = [{"text": "Alpha beta gamma. Delta epsilon! Zeta theta?\nKappa lambda"},
               {"text": "Sigma omega. tensor matrix"}, {"id": 3}, "not a dict"]
    lines = [json.dumps(r) for r in records] + ["{broken json"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    manifest = prepare(tmp_path / "c.jsonl", tmp_path / "out", vocab=vocab, settings=SMALL)
    docs, _ = all_shards(PreparedCorpus(tmp_path / "out"))
    # The second record is one sentence ("tensor" starts lowercase, so no split there): dropped.
    assert [len(d) for d in docs] == [4]
    assert split_sentences("Sigma omega. tensor matrix") == ["Sigma omega. tensor matrix"]
    assert split_sentences('He said "Hi." (Then) left.  3 more') == ['He said "Hi."', "(Then) left.", "3 more"]
    assert manifest["skipped"] == {"bad_json_lines": 3, "short_documents": 1}


def test_trains_a_vocab_when_none_is_given(tmp_path):
    write_text(tmp_path / "a.txt", text_documents(300, seed=2))
    manifest = prepare(tmp_path / "a.txt", tmp_path / "out", settings=PrepareSettings(vocab_size=200))
    words = (tmp_path / "out" / "vocab.txt").read_text().splitlines()
    assert words[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(words) <= 200
    assert manifest["totals"]["documents"] == 300
    # Asking for another vocab size trains again (the old vocab would not match the manifest's
    # settings); the same settings reuse the trained vocab.
    again = prepare(tmp_path / "a.txt", tmp_path / "out", settings=PrepareSettings(vocab_size=150))
    assert again["vocab"]["size"] <= 150 < manifest["vocab"]["size"]
    mtime = (tmp_path / "out" / "vocab.txt").stat().st_mtime_ns
    assert prepare(tmp_path / "a.txt", tmp_path / "out", settings=PrepareSettings(vocab_size=150)) == again
    assert (tmp_path / "out" / "vocab.txt").stat().st_mtime_ns == mtime


def shard_files(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_rerun_is_idempotent_and_interrupt_resumes(tmp_path, vocab, monkeypatch):
    write_text(tmp_path / "a.txt", text_documents(300, seed=3))
    clean = prepare(tmp_path / "a.txt", tmp_path / "clean", vocab=vocab, settings=SMALL)
    before = shard_files(tmp_path / "clean")
    assert prepare(tmp_path / "a.txt", tmp_path / "clean", vocab=vocab, settings=SMALL) == clean
    assert shard_files(tmp_path / "clean") == before, "a finished corpus is left untouched"

    # Interrupt shard 2 half way through writing its second file, as Ctrl-C would.
    calls, real_write = [], writer._write_array

    def failing_write(path, array):
        calls.append(path.name)
        if len(calls) == 10:
            with atomic_path(path) as tmp:
                tmp.write_bytes(array.tobytes()[: array.nbytes // 2])
                raise KeyboardInterrupt
        real_write(path, array)

    monkeypatch.setattr(writer, "_write_array", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "a.txt", tmp_path / "out", vocab=vocab, settings=SMALL)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "shard_00001.json" in names and "shard_00002.json" not in names
    assert "shard_00002.tokens.npy" in names and "shard_00002.word_starts.npy" not in names
    assert "manifest.json" not in names
    assert not [n for n in names if n.endswith(".tmp")], "no temporary file is left behind"
    with pytest.raises(FileNotFoundError, match="did not finish"):
        PreparedCorpus(tmp_path / "out")

    monkeypatch.setattr(writer, "_write_array", real_write)
    kept = {n: t for n, t in shard_files(tmp_path / "out").items() if n.startswith(("shard_00000", "shard_00001"))}
    calls.clear()
    resumed = prepare(tmp_path / "a.txt", tmp_path / "out", vocab=vocab, settings=SMALL)
    assert {n: shard_files(tmp_path / "out")[n] for n in kept} == kept, "complete shards are not rewritten"
    strip = lambda m: {k: v for k, v in m.items() if k != "inputs"}  # noqa: E731
    assert strip(resumed) == strip(clean), "the resumed corpus equals an uninterrupted one"


def test_corrupted_shard_is_detected_and_rebuilt(tmp_path, vocab):
    write_text(tmp_path / "a.txt", text_documents(200, seed=4))
    manifest = prepare(tmp_path / "a.txt", tmp_path / "out", vocab=vocab, settings=SMALL)
    victim = tmp_path / "out" / manifest["shards"][1]["files"]["tokens"]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    corpus = PreparedCorpus(tmp_path / "out")
    corpus.shard(0)
    with pytest.raises(ValueError, match=f"checksum mismatch: .*{victim.name} is corrupted"):
        corpus.shard(1)
    assert prepare(tmp_path / "a.txt", tmp_path / "out", vocab=vocab, settings=SMALL) == manifest
    PreparedCorpus(tmp_path / "out").shard(1)
    # A damaged manifest is named when read, and prepare writes it again.
    (tmp_path / "out" / "manifest.json").write_text('{"format_version": 1, "shar')
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        PreparedCorpus(tmp_path / "out")
    assert prepare(tmp_path / "a.txt", tmp_path / "out", vocab=vocab, settings=SMALL) == manifest


def test_vocab_that_does_not_match_the_manifest(tmp_path, vocab):
    write_text(tmp_path / "a.txt", text_documents(20))
    prepare(tmp_path / "a.txt", tmp_path / "out", vocab=vocab, settings=SMALL)
    other = tmp_path / "other.txt"
    other.write_text(vocab.read_text() + "extra\n")
    with pytest.raises(ValueError, match="does not match the vocab the shards"):
        PreparedCorpus(tmp_path / "out", vocab=other)
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \['\[PAD\]'"):
        prepare(tmp_path / "a.txt", tmp_path / "out2", vocab=bad)


def test_bad_inputs_are_named_or_counted(tmp_path, vocab, caplog):
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        prepare(tmp_path / "missing.txt", tmp_path / "out", vocab=vocab)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .txt"):
        prepare(tmp_path / "empty_dir", tmp_path / "out", vocab=vocab)
    (tmp_path / "empty.txt").write_text("\n\n\n")
    with pytest.raises(ValueError, match="no documents left"):
        prepare(tmp_path / "empty.txt", tmp_path / "out", vocab=vocab)
    (tmp_path / "ones.txt").write_text("Alpha beta.\n\nGamma delta.\n")
    with pytest.raises(ValueError, match=r"fewer than 2 sentences.*'short_documents': 2"):
        prepare(tmp_path / "ones.txt", tmp_path / "out", vocab=vocab)
    with pytest.raises(ValueError, match="shard_tokens must be a positive int"):
        PrepareSettings(shard_tokens=0)

    good = "Alpha beta gamma.\nDelta epsilon.\n\n"
    raw = (good + "Zeta \xff theta.\n".replace("\xff", "@") + "Kappa lambda.\n\n" + "Sigma " * 50 + "\nOmega x.\n"
           + "Tensor matrix.\n\n" + "Single sentence document.\n")
    raw = raw.encode().replace(b"@", b"\xff\xfe")
    (tmp_path / "messy.txt").write_bytes(raw)
    manifest = prepare(tmp_path / "messy.txt", tmp_path / "out", vocab=vocab,
                       settings=PrepareSettings(max_line_chars=100))
    assert re.search(r"messy.txt: 1 line\(s\) had bytes that are not UTF-8", caplog.text)
    # The over-long line is dropped and its document keeps 2 sentences; the last has only one.
    assert manifest["skipped"] == {"non_utf8_lines": 1, "long_lines": 1, "short_documents": 1}
    assert manifest["totals"]["documents"] == 3


def messy_inputs(folder: Path) -> list[Path]:
    """Text with over-long lines (one of spaces), non-UTF-8 bytes, blank lines of whitespace (one
    U+3000), CRLF, sentences with no tokens, non-ASCII sentences, one-sentence documents and no
    final newline; JSONL with bad and empty lines."""
    rng = np.random.default_rng(11)
    parts = []
    for i, doc in enumerate(text_documents(150, seed=12)):
        r = rng.random()
        lines = doc[:1] if r < 0.1 else list(doc)
        extra = {1: "Sigma " * 60, 2: " " * 400, 3: "Zeta @ theta.", 4: "\x01\x02", 5: "Café crème brûlée."}
        if i % 7 in extra:
            lines.insert(1, extra[i % 7])
        parts.append("\n".join(lines) + ["\n\n", "\n \n", "\n\n\n", "\r\n\t\r\n", "\n\u3000\n"][i % 5])
    text = folder / "messy.txt"
    text.write_bytes("".join(parts).rstrip().encode().replace(b"@", b"\xff\xfe"))
    records = []
    for i, doc in enumerate(text_documents(80, seed=13)):
        records.append("{broken" if i % 9 == 0 else "" if i % 11 == 0 else json.dumps({"text": " ".join(doc)}))
    jsonl = folder / "c.jsonl"
    jsonl.write_text("\n".join(records) + "\n")
    return [text, jsonl, text]


def test_workers_and_chunk_size_do_not_change_the_output(tmp_path, vocab, caplog):
    """One process with one chunk per file, a pool of 3 with chunks of ~700 bytes, and a pool of 2
    with one document per chunk write the same files, byte for byte, and the same warnings."""
    inputs = messy_inputs(tmp_path)
    outputs = {}
    for workers, chunk in ((1, 1 << 20), (3, 700), (2, 1)):
        settings = PrepareSettings(shard_tokens=300, max_line_chars=300, batch_chars=chunk, workers=workers)
        out = tmp_path / f"out_{workers}_{chunk}"
        caplog.clear()
        manifest = prepare(inputs, out, vocab=vocab, settings=settings)
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        outputs[workers, chunk] = files, sorted(m for m in warned if "not UTF-8" in m)
    (files, warned), *others = outputs.values()
    assert len(manifest["shards"]) > 5 and len(warned) == 2 and "messy.txt: 21 line(s)" in warned[0]
    assert set(manifest["skipped"]) == {"non_utf8_lines", "long_lines", "bad_json_lines", "empty_sentences",
                                        "short_documents"}
    for other_files, other_warned in others:
        assert other_files.keys() == files.keys()
        assert [n for n in files if files[n] != other_files[n]] == []
        assert other_warned == warned


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path, vocab):
    path = tmp_path / "secret.txt"
    path.write_text("A b.\nC d.\n")
    path.chmod(0)
    with pytest.raises(PermissionError, match="secret.txt is not readable"):
        prepare(path, tmp_path / "out", vocab=vocab)


PEAK = """
import resource, sys
from bert_fast.data.prepare import PrepareSettings, prepare
def status_kib(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: imports (torch) are not prepare's
base = status_kib("VmHWM")
prepare([sys.argv[1]], sys.argv[2], vocab=sys.argv[3],
        settings=PrepareSettings(shard_tokens=int(sys.argv[4]), batch_chars=1 << 16, workers=int(sys.argv[5])))
# The largest worker's peak RSS (0 without workers): forked, so it counts pages shared with this one.
print(status_kib("VmHWM") - base, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_prepare_memory_does_not_grow_with_the_corpus(tmp_path, vocab):
    """Peak RSS growth during prepare (VmHWM after resetting it; getrusage's ru_maxrss would only
    show the torch import) at 1x and 4x the input, in one process and with 2 worker processes
    (the parent's and the largest worker's peak): flat with 20k-token shards, while a single shard
    holding the whole corpus does grow by more than the tolerance (by about its token arrays),
    which shows the measurement can see growth."""
    for scale in (1, 4):
        write_text(tmp_path / f"in{scale}.txt", text_documents(3000 * scale, seed=scale))

    def peak(scale, shard_tokens, workers):
        result = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / f"in{scale}.txt"),
                                 str(tmp_path / f"out{scale}_{shard_tokens}_{workers}"), str(vocab),
                                 str(shard_tokens), str(workers)], capture_output=True, text=True, check=True)
        return [int(v) for v in result.stdout.split()[-2:]]

    mib = (tmp_path / "in4.txt").stat().st_size / 2**20
    for workers in (1, 2):
        (small, small_child), (large, large_child) = peak(1, 20000, workers), peak(4, 20000, workers)
        one_shard = peak(4, 10**9, workers)[0]
        print(f"{workers} worker(s), peak growth KiB: 1x {small}, 4x {large}, 4x in one shard {one_shard}; "
              f"largest worker's peak KiB: 1x {small_child}, 4x {large_child}; 4x input {mib:.1f} MiB")
        assert large - small < 2048, (small, large)
        assert abs(large_child - small_child) < 2048, (small_child, large_child)
        assert one_shard - large > 2048, (large, one_shard)


@pytest.mark.skipif(not native_available(), reason="bert_fast._data is not built")
def test_ascii_fast_path_matches_tokenizers(tmp_path):
    """The C++ WordPiece (ASCII sentences) gives the `tokenizers` library's ids: a trained vocab,
    prose, punctuation, control characters, words over 100 characters, unknown pieces; non-ASCII
    sentences go to `tokenizers` and come back in their places."""
    from bert_fast.data.prepare.wordpiece import Tokenizer

    rng = np.random.default_rng(0)
    prose = [s for d in text_documents(300, seed=5) for s in d]
    write_text(tmp_path / "a.txt", [prose[i:i + 3] for i in range(0, len(prose), 3)])
    prepare(tmp_path / "a.txt", tmp_path / "out", settings=PrepareSettings(vocab_size=300))
    noise = ["".join(map(chr, rng.integers(0, 128, rng.integers(0, 60)))) for _ in range(500)]
    sentences = prose + noise + ["a" * 101, "Tab\there\x0bvt\x0cff\x1fus\x7fdel", "x" * 100 + "!",
                                 "Héllo wörld, ñandú 中文.", "(Q&A) e.g. 3.14 -- [ok]?"]
    rng.shuffle(sentences)
    tokenizer = Tokenizer(tmp_path / "out" / "vocab.txt", lowercase=True)
    assert tokenizer.fast is not None
    ids, lengths = tokenizer(sentences)
    ref = tokenizer.tokenizer.encode_batch(sentences, add_special_tokens=False)
    assert lengths.tolist() == [len(e.ids) for e in ref]
    assert ids.tolist() == [i for e in ref for i in e.ids]
    assert (ids == 1).any(), "[UNK] cases were exercised"


def test_command_line(tmp_path, vocab, capsys):
    from bert_fast.cli import main

    write_text(tmp_path / "a.txt", text_documents(30))
    assert main(["data", "prepare", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "out"),
                 "--vocab", str(vocab), "--shard-tokens", "500", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["documents"] == 30 and summary["shards"] == len(PreparedCorpus(tmp_path / "out").manifest["shards"])
    assert main(["data", "prepare", "--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o")]) == 1
    assert "error: input file" in capsys.readouterr().err
    assert main(["data", "prepare", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "o"),
                 "--workers", "-1"]) == 1
    assert "error: workers must be an int >= 0, got -1" in capsys.readouterr().err


@pytest.mark.skipif(not native_available(), reason="bert_fast._data is not built")
def test_fast_path_reads_the_vocab_as_tokenizers_does(tmp_path):
    """A word listed twice takes its last id, a trailing space is trimmed, and only "\\n" ends a
    line (not \\x85 or \\x0c inside a word), as in `tokenizers`; a non-UTF-8 vocab is named."""
    from bert_fast.data.prepare.wordpiece import Tokenizer
    from bert_fast.data.shards import read_vocab

    path = tmp_path / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "a\x85b", "world", "hello", "x ", "c\x0cd", "z"]
    path.write_bytes(("\r\n".join(words) + "\r\n").encode())
    assert read_vocab(path) == words
    tokenizer = Tokenizer(path, lowercase=True)
    sentences = ["hello world x z", "z hello", "x"]
    ids, lengths = tokenizer(sentences)
    ref = tokenizer.tokenizer.encode_batch(sentences, add_special_tokens=False)
    assert ids.tolist() == [i for e in ref for i in e.ids] == [8, 7, 9, 11, 11, 8, 9]
    assert lengths.tolist() == [len(e.ids) for e in ref]
    path.write_bytes(b"[PAD]\n\xff\n")
    with pytest.raises(ValueError, match="vocab.txt is not UTF-8"):
        read_vocab(path)


def random_bytes(n: int, seed: int, nul: bool) -> bytes:
    """Seeded random bytes, with or without NUL bytes."""
    data = np.random.default_rng(seed).integers(0 if nul else 1, 256, n, dtype=np.uint8).tobytes()
    return data


def test_files_that_are_not_text_are_refused_before_anything_is_written(tmp_path, vocab):
    """Random bytes around two good lines (the share of non-UTF-8 lines) and random bytes with NUL
    bytes, or UTF-16 text (a NUL byte), are refused naming the file and the share, before a vocab
    or a shard sees them: a fresh output stays empty, a prepared one untouched. A few bad lines
    in a real file still pass and are counted; the limit is a setting."""
    write_text(tmp_path / "good.txt", text_documents(60, seed=6))
    junk = random_bytes(51_000, seed=1, nul=False)
    (tmp_path / "mixed.txt").write_bytes(b"Alpha beta gamma.\n" + junk[:25_000] + b"\nDelta epsilon.\n" + junk[25_000:])
    (tmp_path / "random.bin.txt").write_bytes(random_bytes(3_000, seed=2, nul=True))
    (tmp_path / "utf16.txt").write_bytes("Alpha beta gamma.\nDelta epsilon.\n".encode("utf-16"))
    good, mixed = tmp_path / "good.txt", tmp_path / "mixed.txt"

    for out, given in ((tmp_path / "trained", None), (tmp_path / "given", vocab)):
        with pytest.raises(NotTextError, match=r"mixed.txt is not UTF-8 text: 9\d\.\d% of its lines \(\d+ of \d+\) "
                                               r"have bytes that are not UTF-8, more than max_non_utf8_share=0.1"):
            prepare([good, mixed], out, vocab=given)
        assert [p.name for p in out.iterdir()] == [".prepare.lock"], "nothing of it is written"
    with pytest.raises(NotTextError, match=r"random.bin.txt is not text: it holds NUL bytes \(the first at byte \d+"):
        prepare(tmp_path / "random.bin.txt", tmp_path / "out", vocab=vocab)
    with pytest.raises(NotTextError, match=r"utf16.txt is not text: it holds NUL bytes \(the first at byte 3;"):
        prepare(tmp_path / "utf16.txt", tmp_path / "out", vocab=vocab)

    manifest = prepare(good, tmp_path / "prepared", vocab=vocab)
    before = {p.name: p.read_bytes() for p in (tmp_path / "prepared").iterdir()}
    with pytest.raises(NotTextError, match="mixed.txt"):
        prepare([good, mixed], tmp_path / "prepared", vocab=vocab)
    assert {p.name: p.read_bytes() for p in (tmp_path / "prepared").iterdir()} == before
    assert PreparedCorpus(tmp_path / "prepared").manifest == manifest

    # 2 bad lines in 10 (20%): refused by the default, passed (replaced and counted) by a limit of 0.2.
    lines = [f"Sentence number {i} here." for i in range(10)]
    lines[3], lines[7] = "Caf\xe9 au lait.", "Na\xefve line."
    (tmp_path / "latin1.txt").write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(NotTextError, match=r"latin1.txt is not UTF-8 text: 20.0% of its lines \(2 of 10\)"):
        prepare(tmp_path / "latin1.txt", tmp_path / "latin1", vocab=vocab)
    manifest = prepare(tmp_path / "latin1.txt", tmp_path / "latin1", vocab=vocab,
                       settings=PrepareSettings(max_non_utf8_share=0.2))
    assert manifest["skipped"] == {"non_utf8_lines": 2} and manifest["totals"]["sentences"] == 10
    with pytest.raises(ValueError, match=r"max_non_utf8_share must be a number in \[0, 1\], got 1.5"):
        PrepareSettings(max_non_utf8_share=1.5)


def test_command_line_refuses_random_bytes_and_logs_bad_lines_without_source_lines(tmp_path, vocab):
    """`bert-fast data prepare` exits 1 naming a file of random bytes and the share; the warning
    about a few bad lines is one log line naming the file, with no Python source line after it;
    --max-non-utf8-share passes a file the default refuses."""
    junk = random_bytes(3_000, seed=3, nul=False)
    (tmp_path / "junk.txt").write_bytes(junk)
    write_text(tmp_path / "a.txt", text_documents(30, seed=7))
    messy = (tmp_path / "a.txt").read_bytes().replace(b"Alpha", b"Alph\xe4", 1)
    assert messy != (tmp_path / "a.txt").read_bytes()
    (tmp_path / "messy.txt").write_bytes(messy)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "bert_fast.data", "prepare", "--vocab", str(vocab),
                               "--workers", "1", *args], capture_output=True, text=True, timeout=300)

    refused = run("--input", str(tmp_path / "a.txt"), str(tmp_path / "junk.txt"), "--output", str(tmp_path / "o1"))
    assert refused.returncode == 1, refused.stderr
    assert re.search(r"^error: input file \S+junk.txt is not UTF-8 text: \d+\.\d% of its lines", refused.stderr, re.M)
    assert "Traceback" not in refused.stderr and not (tmp_path / "o1" / "vocab.txt").exists()

    done = run("--input", str(tmp_path / "messy.txt"), "--output", str(tmp_path / "o2"))
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "not UTF-8" in line]
    assert warning == [f"WARNING bert_fast.data: {tmp_path / 'messy.txt'}: 1 line(s) had bytes that are not UTF-8; "
                       "replaced by U+FFFD"], done.stderr
    assert "prepare(" not in done.stderr and "Warning:" not in done.stderr, done.stderr

    allowed = run("--input", str(tmp_path / "junk.txt"), "--output", str(tmp_path / "o3"), "--max-non-utf8-share", "1",
                  "--min-sentences", "1")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout.splitlines()[-1])["skipped"]["non_utf8_lines"] > 0


def test_trained_vocab_honours_vocab_size_with_many_characters(tmp_path):
    """An input with 700 distinct CJK characters: `tokenizers` kept 1000 characters (and `##`
    forms) before any merge, so vocab_size=600 gave more than 600 words; now the vocab has at
    most 600, keeps the most frequent characters and still has room for merged words."""
    rng = np.random.default_rng(8)
    chars = [chr(0x4E00 + i) for i in range(700)]
    documents = [[" ".join(rng.choice(chars, 4)) + " " + s for s in doc] for doc in text_documents(200, seed=9)]
    documents.append(["\u4e00 " * 50 + "Alpha.", "\u4e01 " * 40 + "Beta."])  # the two most frequent characters
    write_text(tmp_path / "cjk.txt", documents)
    manifest = prepare(tmp_path / "cjk.txt", tmp_path / "out", settings=PrepareSettings(vocab_size=600))
    words = PreparedCorpus(tmp_path / "out").words
    assert len(words) == manifest["vocab"]["size"] <= 600
    assert "\u4e00" in words and "\u4e01" in words
    assert {"alpha", "gamma", "tensor"} <= set(words), "room is left for merged words"


def test_short_trained_vocab_is_logged_with_its_reason(tmp_path, caplog):
    """An input too small for the vocab asked: the manifest records the request beside the size,
    and prepare warns with the reason when it trains, and repeats it as info when it finds the
    corpus prepared (a second run has nothing new to warn about).
    The reason holds: without the minimum pair frequency of 2 the trainer reaches the size."""
    from tokenizers import BertWordPieceTokenizer

    rng = np.random.default_rng(10)
    once_each = [["".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), 9)) + "." for _ in range(2)] for _ in range(20)]
    documents = text_documents(100, seed=10) + once_each  # words seen once: their pairs are never merged
    write_text(tmp_path / "a.txt", documents)
    manifest = prepare(tmp_path / "a.txt", tmp_path / "out", settings=PrepareSettings(vocab_size=2000))
    size = manifest["vocab"]["size"]
    assert manifest["vocab"]["requested"] == 2000 and size < 2000
    note = (f"the vocab trained on the input has {size} words, not the 2000 asked (vocab_size): training stops "
            "when no pair of adjacent pieces occurs at least 2 times in the input")
    assert [r.levelname for r in caplog.records if note in r.getMessage()] == ["WARNING"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bert_fast.data"):
        assert prepare(tmp_path / "a.txt", tmp_path / "out", settings=PrepareSettings(vocab_size=2000)) == manifest
    assert [r.levelname for r in caplog.records if note in r.getMessage()] == ["INFO"]

    sentences = [s for doc in documents for s in doc]
    once = BertWordPieceTokenizer(lowercase=True)
    once.train_from_iterator(sentences, vocab_size=2000, min_frequency=1, show_progress=False,
                             special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert once.get_vocab_size() > size

    caplog.clear()
    given = prepare(tmp_path / "a.txt", tmp_path / "given", vocab=tmp_path / "out" / "vocab.txt")
    assert "requested" not in given["vocab"] and "vocab trained" not in caplog.text
