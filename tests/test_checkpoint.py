"""bert_fast.train.checkpoint: DeepSpeed's files hashed as they are written (zip CRC32 left out),
a failed write named in one line (a full disk with the space needed and free), pruning, each rank
making only its own files durable, and the RNG states a checkpoint saves. One process, stand-in
engines; the 2-rank DeepSpeed saves and loads are in test_checkpoint_ranks.py."""

from __future__ import annotations

import os

import pytest
import torch
from checkpoint_fixtures import fake_checkpoint as _fake

from bert_fast.train import checkpoint as ckpt
from bert_fast.train import checkpoint_manifest as manifest
from bert_fast.train.checkpoint_manifest import CheckpointError


def test_deepspeeds_files_are_hashed_as_their_bytes_are_written(tmp_path, monkeypatch):
    """DeepSpeed's checkpoint engine writes each file through the hasher, so its digests are ready
    when torch.save closes it (not computed after the whole save), and the bytes are those
    torch.save writes to a path."""
    ce_module = pytest.importorskip("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine")
    from bert_fast.train import checksums

    events = []
    close = checksums.HashingWriter.close
    monkeypatch.setattr(checksums.HashingWriter, "close", lambda self: (
        close(self), events.append(("hashed", self.path.name)))[0])
    state = {"w": torch.randn(300, 7), "opt": [torch.arange(5), {"m": torch.ones(4, dtype=torch.bfloat16)}]}

    engine = _stage1_engine(ce_module, state, ("mp_rank_00_model_states.pt",
                                               "zero_pp_rank_0_mp_rank_00_optim_states.pt"), events)
    path = ckpt.save(engine, tmp_path, 1, {"step": 1}, keep=0)
    assert events == [("write", "mp_rank_00_model_states.pt"), ("hashed", "mp_rank_00_model_states.pt"),
                      ("write", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                      ("hashed", "zero_pp_rank_0_mp_rank_00_optim_states.pt")]
    assert "save" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method again
    assert sorted(manifest.validate(path)["files"]) == ["mp_rank_00_model_states.pt", "rng_rank00000.pt",
                                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    engine.checkpoint_engine.save(state, str(tmp_path / "direct.pt"))  # unhooked: torch.save to a path
    assert (path / "mp_rank_00_model_states.pt").read_bytes() == (tmp_path / "direct.pt").read_bytes()


def _stage1_engine(ce_module, state: dict, names: tuple[str, ...], events: list | None = None):
    """A stand-in for a ZeRO-1 engine whose save writes `state` to each of `names` through
    DeepSpeed's own TorchCheckpointEngine (as the real one does), noting each write in `events`."""

    class Engine:
        optimizer = None
        checkpoint_engine = ce_module.TorchCheckpointEngine()

        def zero_optimization_stage(self):
            return 1

        def save_checkpoint(self, folder, tag, client_state, save_latest):
            for name in names:
                if events is not None:
                    events.append(("write", name))
                self.checkpoint_engine.save(state_dict=state, path=os.path.join(folder, tag, name))

    return Engine()


def test_deepspeeds_zip_files_are_written_without_their_crc32_and_load(tmp_path):
    """In the zip format (DeepSpeed's config default) the records' CRC32, which torch.load never
    checks and which cost as much time as the sha256, is left out while DeepSpeed's files are
    written, and only then: the bytes are torch.save's to a file object with
    set_crc32_options(False) (records named archive/..., not after the file), the file loads,
    the sha256 still refuses a changed byte, and torch.save's option is restored."""
    import io
    import zipfile

    ce_module = pytest.importorskip("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine")
    if not hasattr(torch.serialization, "get_crc32_options"):
        pytest.skip("torch < 2.6 always writes the CRC32")
    state = {"w": torch.randn(300, 7), "m": torch.ones(4, dtype=torch.bfloat16)}

    engine = _stage1_engine(ce_module, state, ("mp_rank_00_model_states.pt",))
    engine.checkpoint_engine.zipfile_serialization = True
    assert torch.serialization.get_crc32_options() is True
    path = ckpt.save(engine, tmp_path, 1, {"step": 1}, keep=0)
    assert torch.serialization.get_crc32_options() is True
    written = path / "mp_rank_00_model_states.pt"
    buffer = io.BytesIO()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, buffer)
    finally:
        torch.serialization.set_crc32_options(True)
    assert written.read_bytes() == buffer.getvalue()
    assert {i.CRC for i in zipfile.ZipFile(written).infolist()} == {0}
    loaded = torch.load(written, weights_only=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    data = bytearray(written.read_bytes())
    data[-200] ^= 1
    written.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt bytes"):
        manifest.validate(path)


def test_a_hashing_writer_gives_the_sha256_of_each_block_whatever_the_writes(tmp_path):
    """Writes of any size, across block boundaries, small ones hashed inline and large ones by the
    threads: the digests are those of the file's blocks read back."""
    import hashlib

    from bert_fast.train import checksums

    block = 256 << 10
    data = os.urandom(3 * (1 << 20) + 12345)
    cuts = [0, 5, 5 + (3 << 19), 5 + (3 << 19) + 7, 5 + (3 << 19) + 7 + block - 3, len(data)]
    with checksums.Hasher(block=block) as hasher:
        with hasher.writer(tmp_path / "f") as f:
            for a, b in zip(cuts, cuts[1:]):
                f.write(memoryview(data)[a:b])
        with hasher.writer(tmp_path / "empty"):
            pass
        digests = hasher.digests()
    assert (tmp_path / "f").read_bytes() == data
    assert digests[tmp_path / "f"] == {"size": len(data), "sha256": [
        hashlib.sha256(data[i:i + block]).hexdigest() for i in range(0, len(data), block)]}
    assert digests[tmp_path / "empty"] == {"size": 0, "sha256": [hashlib.sha256(b"").hexdigest()]}


def test_a_failed_write_is_one_line_and_a_full_disk_names_the_space_needed_and_free(tmp_path, monkeypatch):
    """torch.save's zip writer reports a full disk as 'unexpected pos', without an errno: a write
    that fails with less space left than the rest of the checkpoint needs is a full disk (the
    previous checkpoint's size; before the first, an estimate from the parameters); any other
    failure names the folder and the error. The failed save's folder is removed."""
    class Engine:
        optimizer = None
        module = torch.nn.Linear(10, 3)  # 33 float32 parameters

        def zero_optimization_stage(self):
            return 0

        def save_checkpoint(self, folder, tag, client_state, save_latest):
            (tmp_path / "run" / manifest.PARTIAL / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 64")

    root = tmp_path / "run"
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 7)
    with pytest.raises(CheckpointError) as first:
        ckpt.save(Engine(), root, 1, {"step": 1}, keep=0)
    assert str(first.value) == (
        f"no space left on device writing {root / manifest.PARTIAL / 'step_00000001'}: checkpoint step_00000001 "
        f"needs 528 bytes (estimated: 33 parameters with an fp32 master copy and two fp32 optimizer moments "
        f"each), its file system has 7 bytes free; free space there or set checkpoint.dir to another disk")
    earlier = _fake(root, 1, payload=b"y" * 5000)
    size = sum(e["size"] for e in manifest.validate(earlier)["files"].values())
    with pytest.raises(CheckpointError, match=rf"checkpoint step_00000002 needs {size / 1e3:.1f} kB "
                                              rf"\({size:,} bytes, the size of step_00000001\), its file "
                                              r"system has 7 bytes free"):
        ckpt.save(Engine(), root, 2, {"step": 2}, keep=0)
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 10 ** 12)
    with pytest.raises(CheckpointError, match=r"^writing .*step_00000002 failed: RuntimeError: \[enforce fail "
                                              r"at inline_container.cc:672\] . unexpected pos 100 vs 64$"):
        ckpt.save(Engine(), root, 2, {"step": 2}, keep=0)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # no .partial


def test_keep_prunes_oldest_and_resave_replaces(tmp_path):
    for step in (1, 2, 3):
        _fake(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    _fake(tmp_path, 3, keep=2, payload=b"z" * 5)  # the same step again: replaced whole
    assert manifest.validate(tmp_path / "step_00000003")["files"]["mp_rank_00_model_states.pt"]["size"] == 5
    with pytest.raises(ValueError, match="keep"):
        ckpt.save(None, tmp_path, 4, {}, keep=-1)


def test_each_rank_makes_only_its_own_files_durable(tmp_path, monkeypatch):
    """Rank 0 fsynced every file of the folder, so it once opened rank 1's RNG file by its
    temporary name as rank 1 renamed it (FileNotFoundError). Here a world of one saves while the
    folder also holds rank 1's partition and its RNG file mid-write: neither is touched."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    synced = []
    monkeypatch.setattr(ckpt, "_fsync", lambda path: synced.append(path.name) if path.is_file() else None)

    class Engine:  # writes what DeepSpeed's ZeRO-3 writes on rank 0; rank 1 writes beside it
        optimizer = None

        def zero_optimization_stage(self):
            return 3

        def save_checkpoint(self, folder, tag, client_state, save_latest):
            for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                         "zero_pp_rank_1_mp_rank_00_optim_states.pt", ".rng_rank00001.pt.k2x9.tmp"):
                (tmp_path / manifest.PARTIAL / tag / name).write_bytes(b"x")

    ckpt.save(Engine(), tmp_path, 1, {"step": 1}, keep=0)
    assert sorted(synced) == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    from bert_fast.train import rng

    torch.save(rng.rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2).tolist())
    rng.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == first
