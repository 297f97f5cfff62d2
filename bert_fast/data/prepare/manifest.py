"""prepare's manifest.json: the fingerprint of what decides the output, whether a folder is already
prepared with it, and the manifest written over the complete shards (totals, skips, vocab, files)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from bert_fast.data.prepare.chunk import COUNTS
from bert_fast.data.prepare.inputs import file_stats
from bert_fast.data.prepare.settings import PrepareSettings, output_settings
from bert_fast.data.prepare.vocab import TRAINED_FILE, VOCAB_FILE
from bert_fast.data.prepare.writer import complete_shards
from bert_fast.data.shards import FORMAT_VERSION, special_ids, token_dtype
from bert_fast.fileio import atomic_write_text

log = logging.getLogger("bert_fast.data")
MANIFEST = "manifest.json"
SKIPS = ("non_utf8_lines", "long_lines", "bad_json_lines", "empty_sentences", "short_documents")


def fingerprint_of(files, settings: PrepareSettings, vocab_sha: str) -> str:
    """What the shards depend on: the format, the inputs, the output settings and the vocab."""
    text = json.dumps([FORMAT_VERSION, file_stats(files), output_settings(settings), vocab_sha],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def finished(output: Path, fingerprint: str) -> dict | None:
    """The manifest of `output` when it is complete and prepared with this fingerprint."""
    try:
        manifest = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):  # absent, not ours, or damaged: prepared again
        return None
    if (isinstance(manifest, dict) and manifest.get("fingerprint") == fingerprint
            and len(complete_shards(output, fingerprint)) == len(manifest["shards"])):
        return manifest
    return None


def write_manifest(files, output: Path, settings: PrepareSettings, fingerprint: str, words: list[str],
                   vocab_sha: str, carry) -> dict:
    """Writes output/manifest.json over the complete shards and returns it; `carry` holds the
    counts (COUNTS) after the last kept document. Raises ValueError when no document was kept."""
    records = complete_shards(output, fingerprint)
    totals = Counter(records[-1]["totals"]) if records else Counter()
    totals.update({k: int(v) for k, v in zip(COUNTS, carry)})
    if not records:
        raise ValueError(f"no documents left in {[str(p) for p, _ in files]}: every document was empty or "
                         f"had fewer than {settings.min_sentences} sentences (skips: {dict(totals)})")
    skipped = {k: totals[k] for k in SKIPS if totals[k]}
    if skipped:
        log.warning("prepare skipped or repaired: %s", ", ".join(f"{k}={v}" for k, v in skipped.items()))
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "inputs": [{"file": str(p), "format": kind, "bytes": p.stat().st_size} for p, kind in files],
        "settings": output_settings(settings),
        "vocab": {"file": VOCAB_FILE, "sha256": vocab_sha, "size": len(words), **special_ids(words),
                  **({"requested": settings.vocab_size} if (output / TRAINED_FILE).is_file() else {})},
        "token_dtype": str(token_dtype(len(words))),
        "totals": {k: totals[k] for k in ("documents", "sentences", "tokens", "bytes")},
        "skipped": skipped,
        "shards": [{"name": r["name"], **{k: r["counts"][k] for k in ("documents", "sentences", "tokens")},
                    "files": r["files"]} for r in records],
    }
    atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=1))
    return manifest
