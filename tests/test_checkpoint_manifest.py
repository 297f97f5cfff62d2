"""bert_fast.train.checkpoint_manifest: a checkpoint folder is refused when partial, unreadable,
truncated or corrupted (naming the bytes), older manifests are still read, and `auto` resumes from
the newest valid checkpoint. The folders are made by the real commit step, without DeepSpeed."""

from __future__ import annotations

import json
import os

import pytest
from checkpoint_fixtures import fake_checkpoint as _fake

from bert_fast.train import checkpoint_manifest as manifest
from bert_fast.train.checkpoint_manifest import CheckpointError


def test_valid_checkpoint_and_metadata(tmp_path):
    path = _fake(tmp_path, 7)
    meta = manifest.validate(path)
    assert meta["step"] == 7 and meta["client_state"] == {"step": 7}
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "rng_rank00000.pt"}
    assert manifest.read_metadata(path)["world_size"] == 1
    assert (tmp_path / "latest").read_text() == "step_00000007"
    assert not (tmp_path / manifest.PARTIAL / "step_00000007").exists()


def test_missing_manifest_is_refused_as_partial(tmp_path):
    path = tmp_path / "step_00000003"
    path.mkdir()
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"step_00000003.*partial"):
        manifest.validate(path)


def test_unparseable_manifest_is_refused(tmp_path):
    path = _fake(tmp_path, 1)
    (path / manifest.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        manifest.validate(path)


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    path = _fake(tmp_path, 1)
    target = path / "mp_rank_00_model_states.pt"
    target.write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt has 10 bytes.*1000"):
        manifest.validate(path)
    target.write_bytes(b"y" * 1000)  # same size, other content
    with pytest.raises(CheckpointError, match="sha256"):
        manifest.validate(path)
    target.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        manifest.validate(path)


def test_every_block_of_a_file_over_64_mib_is_hashed_and_a_flip_names_its_bytes(tmp_path):
    """main hashed files up to 64 MiB and recorded only the size of larger ones, so a flipped
    byte in them passed. Now each 64 MiB block of every file has its sha256 (the plain sha256
    of the file when it is one block), and a flip anywhere is refused, naming its block."""
    import hashlib

    block = 64 << 20
    payload = bytearray(os.urandom(block + (1 << 20) + 3))
    path = _fake(tmp_path, 1, payload=bytes(payload))
    entries = manifest.validate(path)["files"]
    assert entries["mp_rank_00_model_states.pt"]["sha256"] == [
        hashlib.sha256(payload[:block]).hexdigest(), hashlib.sha256(payload[block:]).hexdigest()]
    rng = (path / "rng_rank00000.pt").read_bytes()
    assert entries["rng_rank00000.pt"] == {"size": len(rng), "sha256": [hashlib.sha256(rng).hexdigest()]}
    target = path / "mp_rank_00_model_states.pt"
    for offset, where in ((block + 10, f"bytes {block}-{len(payload) - 1}"), (5, f"bytes 0-{block - 1}")):
        flipped = bytearray(payload)
        flipped[offset] ^= 1
        target.write_bytes(flipped)
        with pytest.raises(CheckpointError, match=f"mp_rank_00_model_states.pt {where} do not match the recorded "
                                                  "sha256"):
            manifest.validate(path)
    target.write_bytes(payload)
    manifest.validate(path)


def test_a_format_1_manifest_is_still_read_and_says_what_it_checks_by_size_only(tmp_path):
    """Checkpoints saved before every block was hashed (one sha256 per file up to 64 MiB, size
    only above) still resume; the files checked by size only are named."""
    import hashlib

    path = tmp_path / "step_00000001"
    path.mkdir()
    (path / "small.pt").write_bytes(b"abc")
    (path / "large.pt").write_bytes(b"x" * 10)
    files = {"small.pt": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}, "large.pt": {"size": 10}}
    (path / manifest.MANIFEST).write_text(json.dumps({"format": 1, "step": 1, "files": files}))
    with pytest.warns(UserWarning, match="large.pt checked by size only"):
        assert manifest.validate(path)["step"] == 1
    (path / "small.pt").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="small.pt bytes 0-2 do not match"):
        manifest.validate(path)
    files["small.pt"].pop("sha256")
    (path / manifest.MANIFEST).write_text(json.dumps({"format": 2, "sha256_block": 64, "step": 1, "files": files}))
    with pytest.raises(CheckpointError, match="not a bert_fast checkpoint manifest"):
        manifest.validate(path)  # format 2 has a digest for every block of every file


def test_auto_resume_skips_a_corrupted_newest(tmp_path):
    older = _fake(tmp_path, 10)
    newest = _fake(tmp_path, 20)
    (newest / "rng_rank00000.pt").write_bytes(b"")
    (tmp_path / manifest.PARTIAL / "step_00000030").mkdir(parents=True)  # an unfinished save: never considered
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000020"):
        assert manifest.resolve_resume(tmp_path, "auto") == older
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step_00000020.*rng_rank00000.pt"):
        manifest.resolve_resume(tmp_path, str(newest))
    assert manifest.resolve_resume(tmp_path, str(older)) == older


def test_auto_resume_without_checkpoints_is_none(tmp_path):
    assert manifest.resolve_resume(tmp_path, "auto") is None
    assert manifest.resolve_resume(tmp_path / "absent", "auto") is None
    with pytest.raises(CheckpointError, match="absent.*does not exist"):
        manifest.resolve_resume(tmp_path, str(tmp_path / "absent"))
