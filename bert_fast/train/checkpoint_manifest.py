"""What a checkpoint folder is, and whether it is whole: names, listing, the manifest, validation.

Layout: `root/step_XXXXXXXX/` holds DeepSpeed's files (model states, ZeRO partitions), one RNG file
per rank (`rng_rankNNNNN.pt`: bert_fast/train/rng.py) and, written last, the manifest
`bert_fast.json`: metadata (step, client_state with the run config, world size, ZeRO stage, git
revision, DeepSpeed version, time) and every file of the folder with its size and a sha256 of each
64 MiB block (bert_fast/train/checksums.py), whatever the file's size. `root/latest` names the
newest tag (DeepSpeed's format); saves are staged under `root/.partial/` (bert_fast/train/checkpoint.py).

`validate` refuses a folder without a parseable manifest (a partial save) or with a file missing, of
another size, or with any block of another sha256 (truncated or corrupted), naming the bytes.
Resume, init_from and export validate first; `resolve_resume` picks the newest valid checkpoint.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from bert_fast.train import checksums

MANIFEST = "bert_fast.json"
FORMAT = 2  # 2: a sha256 per block of every file; 1: one sha256 per file up to 64 MiB, size only above
_FORMAT1_BLOCK = 64 << 20
PARTIAL = ".partial"
RNG_PREFIX = "rng_rank"
_TAG = re.compile(r"^step_(\d{8,})$")


class CheckpointError(Exception):
    """A checkpoint that is missing, partial, corrupted or incompatible; the message names it."""


def rng_file(rank: int) -> str:
    """The name of rank `rank`'s RNG file in a checkpoint folder."""
    return f"{RNG_PREFIX}{rank:05d}.pt"


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_XXXXXXXX folder under root, oldest first (valid or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found)


def read_metadata(path: str | Path) -> dict:
    """The manifest's metadata (step, client_state, world_size, zero_stage, git_revision, ...)
    without checking the files; `validate` checks them."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'not a folder' if path.exists() else 'does not exist'}")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; a partial checkpoint (its save did not finish)")
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest}: unreadable manifest ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (1, FORMAT) or not isinstance(
            meta.get("files"), dict) or not all(_entry_ok(e, meta) for e in meta["files"].values()):
        raise CheckpointError(f"{manifest}: not a bert_fast checkpoint manifest of format 1 or {FORMAT}")
    return meta


def _entry_ok(entry, meta: dict) -> bool:
    """Format 2: a size and one sha256 per block. Format 1: a size, and a sha256 up to 64 MiB."""
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
        return False
    digests = entry.get("sha256")
    if meta["format"] == 1:
        return digests is None or isinstance(digests, str)
    block = meta.get("sha256_block")
    return isinstance(block, int) and block > 0 and isinstance(digests, list) and len(digests) == (
        checksums.block_count(entry["size"], block))


def validate(path: str | Path) -> dict:
    """Raises CheckpointError for a partial or corrupted checkpoint; returns its metadata.
    Every byte of every file is hashed (in parallel threads) and compared with the manifest."""
    path = Path(path)
    meta = read_metadata(path)
    recorded, size_only = {}, []
    for rel, entry in meta["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: {rel} is missing")
        size = f.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {rel} has {size} bytes, the manifest records "
                                  f"{entry['size']} (truncated or overwritten)")
        digests = entry.get("sha256")
        if digests is None:
            size_only.append(rel)
        else:  # format 1 recorded one sha256 of the whole file: one block of 64 MiB
            recorded[rel] = [digests] if isinstance(digests, str) else digests
    try:
        bad = checksums.mismatches(path, recorded, meta.get("sha256_block", _FORMAT1_BLOCK))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it to check its sha256 ({err})") from None
    if bad:
        more = f" (and {len(bad) - 1} more blocks)" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: {bad[0]}{more} do not match the recorded sha256 (corrupted)")
    if size_only:
        warnings.warn(f"{path}: saved by an older bert_fast that recorded only the size of files over "
                      f"64 MiB; {', '.join(size_only)} checked by size only", stacklevel=2)
    return meta


def resolve_resume(root: str | Path, resume: str) -> Path | None:
    """'auto': the newest valid checkpoint under root (invalid ones skipped with a warning), or
    None if there is none. Anything else: a checkpoint folder that must be valid."""
    if resume == "auto":
        for _, path in reversed(checkpoints(Path(root))):
            try:
                validate(path)
                return path
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
        return None
    path = Path(resume)
    try:
        validate(path)
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume from {resume}: {err}") from None
    return path
