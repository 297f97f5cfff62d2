"""The prepared-corpus format: shard files, manifest.json, and reading them back with checks.

A prepared folder holds `vocab.txt`, `manifest.json` and, per shard k, four .npy files:
`shard_{k:05d}.tokens.npy` (uint16 when the vocab fits, else int32 [T]), `.word_starts.npy`
(uint8 [T], 1 where a word begins, i.e. the piece is not a `##` continuation), `.sentences.npy`
(int64 [S + 1] token offsets) and `.documents.npy` (int64 [D + 1] sentence offsets), plus a
`shard_{k:05d}.json` record written last (sha256 of each file, counts, where in the input the
shard ends). Every file is written to a temporary name and renamed, so a record exists only for a
complete shard, and the manifest only for a complete corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bert_fast.fileio import sha256_file

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ARRAYS = ("tokens", "word_starts", "sentences", "documents")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def read_vocab(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file {path} does not exist")
    # One word per "\n"-ended line, as `tokenizers` reads it (str.splitlines would also split at
    # \x0b, \x0c, \x1c-\x1e, \x85, \u2028 and \u2029, shifting every later id).
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"vocab file {path} is not UTF-8 ({err})") from None
    words = [w[:-1] if w.endswith("\r") else w for w in text.split("\n")]
    if words and words[-1] == "":
        words.pop()
    if not words:
        raise ValueError(f"vocab file {path} is empty")
    missing = [t for t in SPECIAL_TOKENS if t not in words]
    if missing:
        raise ValueError(f"vocab file {path} lacks the special token(s) {missing}")
    return words


def special_ids(words: list[str]) -> dict[str, int]:
    index = {w: i for i, w in enumerate(words)}
    return {"pad_id": index["[PAD]"], "unk_id": index["[UNK]"], "cls_id": index["[CLS]"],
            "sep_id": index["[SEP]"], "mask_id": index["[MASK]"]}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


@dataclass
class Shard:
    tokens: np.ndarray       # uint16 | int32 [T]
    word_starts: np.ndarray  # uint8 [T]
    sentences: np.ndarray    # int64 [S + 1], token offsets
    documents: np.ndarray    # int64 [D + 1], sentence offsets

    @property
    def doc_starts(self) -> np.ndarray:
        """Token offset where each document begins, int64 [D]."""
        return np.asarray(self.sentences[np.asarray(self.documents[:-1])], dtype=np.int64)


class PreparedCorpus:
    """A prepared folder, checked: complete (manifest present), of our format version, matching
    `vocab` when one is given, and every shard file matching its sha256 when first opened."""

    def __init__(self, folder: str | Path, vocab: str | Path | None = None, verify: bool = True):
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder} has no manifest.json: not a prepared corpus, or its "
                                    "preparation did not finish (run `bert-fast data prepare` again)")
        try:
            self.manifest = json.loads(manifest.read_text())
        except ValueError as err:
            raise ValueError(f"{manifest} is not valid JSON ({err}); run `bert-fast data prepare` "
                             "again") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format_version") != FORMAT_VERSION:
            version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
            raise ValueError(f"{manifest}: format version {version!r}, this "
                             f"bert_fast reads {FORMAT_VERSION}; prepare the corpus again")
        self.vocab_path = self.folder / self.manifest["vocab"]["file"]
        if vocab is not None and sha256_file(Path(vocab)) != self.manifest["vocab"]["sha256"]:
            raise ValueError(f"vocab {vocab} does not match the vocab the shards in {self.folder} were "
                             f"prepared with (sha256 {self.manifest['vocab']['sha256'][:12]}...)")
        if sha256_file(self.vocab_path) != self.manifest["vocab"]["sha256"]:
            raise ValueError(f"{self.vocab_path} changed since the shards were prepared (sha256 mismatch)")
        self.words = read_vocab(self.vocab_path)
        self.special = special_ids(self.words)
        self.verify = verify
        self._verified: set[int] = set()

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, index: int) -> Shard:
        entry = self.manifest["shards"][index]
        arrays = {}
        for name in ARRAYS:
            path = self.folder / entry["files"][name]["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard file {path} is missing; run prepare again")
            check = self.verify and index not in self._verified
            if check and sha256_file(path) != entry["files"][name]["sha256"]:
                raise ValueError(f"checksum mismatch: {path} is corrupted (its sha256 differs from "
                                 "manifest.json); delete it and run prepare again")
            arrays[name] = np.load(path, mmap_mode="r")
        self._verified.add(index)
        return Shard(**arrays)
