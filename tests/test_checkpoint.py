"""bert_fast.train.checkpoint: atomic save, validation, exact resume under DeepSpeed ZeRO-3 and -2
(and ZeRO-3 training our model as ZeRO-2 does).

The validation tests build checkpoint folders through the real commit step without DeepSpeed.
The DeepSpeed tests share ONE launch of 2 CPU ranks (gloo; DeepSpeed's first start is slow) that
saves, prunes, reloads into fresh engines and records what it saw; test_export.py reuses it.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from ranks import run_ranks

from bert_fast.train import checkpoint as ckpt
from bert_fast.train.checkpoint import CheckpointError

WORLD = 2
MODEL = dict(vocab_size=101, num_hidden_layers=1, backend="torch", hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)


# ---- validation, without DeepSpeed -------------------------------------------------------

def _fake(root, step, keep=0, payload=b"x" * 1000):
    """A checkpoint folder made by the real commit step (world size 1)."""
    staging = root / ckpt.PARTIAL / f"step_{step:08d}"
    staging.mkdir(parents=True)
    (staging / "mp_rank_00_model_states.pt").write_bytes(payload)
    torch.save(ckpt._rng_state(), staging / "rng_rank00000.pt")
    meta = {"format": ckpt.FORMAT, "step": step, "tag": staging.name, "world_size": 1, "zero_stage": 0,
            "client_state": {"step": step}}
    ckpt._commit(root, staging, root / staging.name, meta, keep)
    return root / staging.name


def test_valid_checkpoint_and_metadata(tmp_path):
    path = _fake(tmp_path, 7)
    meta = ckpt.validate(path)
    assert meta["step"] == 7 and meta["client_state"] == {"step": 7}
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "rng_rank00000.pt"}
    assert ckpt.read_metadata(path)["world_size"] == 1
    assert (tmp_path / "latest").read_text() == "step_00000007"
    assert not (tmp_path / ckpt.PARTIAL / "step_00000007").exists()


def test_missing_manifest_is_refused_as_partial(tmp_path):
    path = tmp_path / "step_00000003"
    path.mkdir()
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"step_00000003.*partial"):
        ckpt.validate(path)


def test_unparseable_manifest_is_refused(tmp_path):
    path = _fake(tmp_path, 1)
    (path / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        ckpt.validate(path)


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    path = _fake(tmp_path, 1)
    target = path / "mp_rank_00_model_states.pt"
    target.write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt has 10 bytes.*1000"):
        ckpt.validate(path)
    target.write_bytes(b"y" * 1000)  # same size, other content
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.validate(path)
    target.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        ckpt.validate(path)


def test_every_block_of_a_file_over_64_mib_is_hashed_and_a_flip_names_its_bytes(tmp_path):
    """main hashed files up to 64 MiB and recorded only the size of larger ones, so a flipped
    byte in them passed. Now each 64 MiB block of every file has its sha256 (the plain sha256
    of the file when it is one block), and a flip anywhere is refused, naming its block."""
    import hashlib

    block = 64 << 20
    payload = bytearray(os.urandom(block + (1 << 20) + 3))
    path = _fake(tmp_path, 1, payload=bytes(payload))
    entries = ckpt.validate(path)["files"]
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
            ckpt.validate(path)
    target.write_bytes(payload)
    ckpt.validate(path)


def test_a_format_1_manifest_is_still_read_and_says_what_it_checks_by_size_only(tmp_path):
    """Checkpoints saved before every block was hashed (one sha256 per file up to 64 MiB, size
    only above) still resume; the files checked by size only are named."""
    import hashlib

    path = tmp_path / "step_00000001"
    path.mkdir()
    (path / "small.pt").write_bytes(b"abc")
    (path / "large.pt").write_bytes(b"x" * 10)
    files = {"small.pt": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}, "large.pt": {"size": 10}}
    (path / ckpt.MANIFEST).write_text(json.dumps({"format": 1, "step": 1, "files": files}))
    with pytest.warns(UserWarning, match="large.pt checked by size only"):
        assert ckpt.validate(path)["step"] == 1
    (path / "small.pt").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="small.pt bytes 0-2 do not match"):
        ckpt.validate(path)
    files["small.pt"].pop("sha256")
    (path / ckpt.MANIFEST).write_text(json.dumps({"format": 2, "sha256_block": 64, "step": 1, "files": files}))
    with pytest.raises(CheckpointError, match="not a bert_fast checkpoint manifest"):
        ckpt.validate(path)  # format 2 has a digest for every block of every file


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
    assert sorted(ckpt.validate(path)["files"]) == ["mp_rank_00_model_states.pt", "rng_rank00000.pt",
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
        ckpt.validate(path)


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
            (tmp_path / "run" / ckpt.PARTIAL / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 64")

    root = tmp_path / "run"
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 7)
    with pytest.raises(CheckpointError) as first:
        ckpt.save(Engine(), root, 1, {"step": 1}, keep=0)
    assert str(first.value) == (
        f"no space left on device writing {root / ckpt.PARTIAL / 'step_00000001'}: checkpoint step_00000001 "
        f"needs 528 bytes (estimated: 33 parameters with an fp32 master copy and two fp32 optimizer moments "
        f"each), its file system has 7 bytes free; free space there or set checkpoint.dir to another disk")
    earlier = _fake(root, 1, payload=b"y" * 5000)
    size = sum(e["size"] for e in ckpt.validate(earlier)["files"].values())
    with pytest.raises(CheckpointError, match=rf"checkpoint step_00000002 needs {size / 1e3:.1f} kB "
                                              rf"\({size:,} bytes, the size of step_00000001\), its file "
                                              r"system has 7 bytes free"):
        ckpt.save(Engine(), root, 2, {"step": 2}, keep=0)
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 10 ** 12)
    with pytest.raises(CheckpointError, match=r"^writing .*step_00000002 failed: RuntimeError: \[enforce fail "
                                              r"at inline_container.cc:672\] . unexpected pos 100 vs 64$"):
        ckpt.save(Engine(), root, 2, {"step": 2}, keep=0)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # no .partial


def test_auto_resume_skips_a_corrupted_newest(tmp_path):
    older = _fake(tmp_path, 10)
    newest = _fake(tmp_path, 20)
    (newest / "rng_rank00000.pt").write_bytes(b"")
    (tmp_path / ckpt.PARTIAL / "step_00000030").mkdir(parents=True)  # an unfinished save: never considered
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000020"):
        assert ckpt.resolve_resume(tmp_path, "auto") == older
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step_00000020.*rng_rank00000.pt"):
        ckpt.resolve_resume(tmp_path, str(newest))
    assert ckpt.resolve_resume(tmp_path, str(older)) == older


def test_auto_resume_without_checkpoints_is_none(tmp_path):
    assert ckpt.resolve_resume(tmp_path, "auto") is None
    assert ckpt.resolve_resume(tmp_path / "absent", "auto") is None
    with pytest.raises(CheckpointError, match="absent.*does not exist"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "absent"))


def test_keep_prunes_oldest_and_resave_replaces(tmp_path):
    for step in (1, 2, 3):
        _fake(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    _fake(tmp_path, 3, keep=2, payload=b"z" * 5)  # the same step again: replaced whole
    assert ckpt.validate(tmp_path / "step_00000003")["files"]["mp_rank_00_model_states.pt"]["size"] == 5
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
                (tmp_path / ckpt.PARTIAL / tag / name).write_bytes(b"x")

    ckpt.save(Engine(), tmp_path, 1, {"step": 1}, keep=0)
    assert sorted(synced) == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    torch.save(ckpt._rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2).tolist())
    ckpt._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == first


# ---- DeepSpeed: one launch of 2 ranks ----------------------------------------------------

def _batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(1, MODEL["vocab_size"], (2, 8), generator=g)
    return dict(input_ids=ids, mlm_labels=ids, next_sentence_label=torch.randint(0, 2, (2,), generator=g))


def _engine(stage, seed):
    import deepspeed

    from bert_fast.config import BertConfig
    from bert_fast.model import BertForPreTraining

    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig.from_preset("tiny", **MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, lr_scheduler=lambda o: (
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1))))
    return engine


def _train_step(engine, step):
    engine.backward(engine(**_batch(step)).loss)  # ZeRO-3's own hooks gather what each module reads
    engine.step()


def _full_params(engine):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                           enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}


def _optimizer_tensors(engine):
    """Every tensor of the (ZeRO) optimizer's state_dict: fp32 partitions, Adam moments, step."""
    def walk(x):
        if torch.is_tensor(x):
            return [x.detach().clone()]
        if isinstance(x, dict):
            return [t for k in sorted(x, key=str) for t in walk(x[k])]
        if isinstance(x, (list, tuple)):
            return [t for v in x for t in walk(v)]
        return []

    tensors = walk(engine.optimizer.state_dict())
    assert len(tensors) > 2, "no optimizer state found"
    return tensors


def _padding(engine) -> list[torch.Tensor]:
    """Views of every padding element of this rank's ZeRO-3 flat partitions, found from DeepSpeed's
    parameters (each holds ceil(numel / world) elements per rank, so the last rank's partition of
    a tensor of odd size ends in padding): the 16-bit copy, the fp32 masters and Adam's moments."""
    opt, rank = engine.optimizer, torch.distributed.get_rank()
    views = []
    for params, master, low in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat):
        moments = [t for t in opt.optimizer.state.get(master, {}).values() if torch.is_tensor(t) and t.shape == master.shape]
        offset = 0
        for p in params:
            width = p.partition_numel()
            held = min(width, max(0, p.ds_numel - rank * width))
            views += [t[offset + held:offset + width] for t in (master, low, *moments) if width > held]
            offset += width
    return views


def _poison_padding(engine, value: float) -> None:
    """What uninitialised memory may hold (it held a NaN about 1 run in 8)."""
    with torch.no_grad():
        for view in _padding(engine):
            view.fill_(value)


def _largest_padding(engine) -> float:
    return max((v.abs().max().item() for v in _padding(engine)), default=0.0)


def _draws():
    import random

    import numpy as np

    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def _max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _worker(rank, r, out):
    from bert_fast.config import BertConfig

    root = os.path.join(out, "z3")
    engine = _engine(3, seed=0)
    config = {"model": {"preset": "tiny", **MODEL}, "train": {"seed": 0}}
    state = {"config": config, "model_config": BertConfig.from_preset("tiny", **MODEL).to_dict()}
    whole = _engine(2, seed=0)  # the same run without partitioned parameters
    initial = _full_params(whole)
    for step in (1, 2, 3):
        _train_step(engine, step)
        _train_step(whole, step)
        if step == 3:
            r["padding_elements"] = sum(v.numel() for v in _padding(engine))
            _poison_padding(engine, float("nan"))
        path = ckpt.save(engine, root, step, {**state, "step": step}, keep=2)
    _poison_padding(engine, 3e38)  # other stale memory, the same state: the same bytes
    again = ckpt.save(engine, os.path.join(out, "z3_again"), 3, {**state, "step": 3}, keep=2)
    r["same_bytes"] = ckpt.validate(again)["files"] == ckpt.validate(path)["files"]
    r["remaining"] = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    r["latest"] = open(os.path.join(root, "latest")).read()
    saved_params, saved_opt = _full_params(engine), _optimizer_tensors(engine)
    r["z3_vs_z2"] = _max_diff(saved_params.values(), _full_params(whole).values())
    r["z3_changed"] = _max_diff(saved_params.values(), initial.values())
    consolidated = ckpt.model_state_dict(path)
    r["consolidated_keys_match"] = sorted(consolidated) == sorted(saved_params)
    r["consolidated_vs_live"] = _max_diff([consolidated[k] for k in saved_params], saved_params.values())
    r["draws_after_save"], lr_saved = _draws(), engine.get_lr()[0]
    _train_step(engine, 4)
    after_step = _full_params(engine)

    fresh = _engine(3, seed=123)  # other weights, and its construction draws random numbers
    resumed = ckpt.resolve_resume(root, "auto")
    client = ckpt.load(fresh, resumed, load_optimizer=True)
    r["resumed"], r["client_step"] = os.path.basename(resumed), client["step"]
    r["draws_after_load"] = _draws()
    r["padding_after_load"] = _largest_padding(fresh)
    r["params_vs_saved"] = _max_diff(_full_params(fresh).values(), saved_params.values())
    r["optimizer_vs_saved"] = _max_diff(_optimizer_tensors(fresh), saved_opt)
    r["lr"] = [fresh.get_lr()[0], lr_saved]
    _train_step(fresh, 4)
    r["padding_after_next_step"] = _largest_padding(fresh)
    r["next_step_vs_uninterrupted"] = _max_diff(_full_params(fresh).values(), after_step.values())

    z2 = _engine(2, seed=7)  # weights only across ZeRO stages; the optimizer state cannot cross
    ckpt.load(z2, path, load_optimizer=False)
    r["z2_weights_vs_saved"] = _max_diff(_full_params(z2).values(), saved_params.values())
    try:
        ckpt.load(z2, path)
        r["stage_refusal"] = None
    except CheckpointError as err:
        r["stage_refusal"] = str(err)
    _train_step(z2, 5)
    z2_path = ckpt.save(z2, os.path.join(out, "z2"), 5, {**state, "step": 5}, keep=0)
    r["z2_consolidated_vs_live"] = _max_diff(ckpt.model_state_dict(z2_path).values(), _full_params(z2).values())

    _claim_on_two_ranks(rank, r, out, again)

    moved = os.path.join(out, "moved", "step_00000003")  # pretend it was saved by 4 ranks
    if rank == 0:
        shutil.copytree(path, moved)
        meta = json.load(open(os.path.join(moved, ckpt.MANIFEST)))
        json.dump({**meta, "world_size": 4}, open(os.path.join(moved, ckpt.MANIFEST), "w"))
    torch.distributed.barrier()
    try:
        ckpt.load(_engine(3, seed=1), moved)
        r["world_refusal"] = None
    except CheckpointError as err:
        r["world_refusal"] = str(err)


def _claim_on_two_ranks(rank, r, out, saved):
    """An output folder holding an earlier run: both ranks get rank 0's refusal; with --overwrite
    rank 0 alone moves it, once, and both learn where it went."""
    from bert_fast.train.output import claim

    run = os.path.join(out, "run")
    if rank == 0:  # before its claim, which the other rank waits for
        shutil.copytree(saved, os.path.join(run, "checkpoints", os.path.basename(saved)))
    try:
        claim(run, os.path.join(run, "checkpoints"), None, False)
        r["claim_refusal"] = None
    except ValueError as err:
        r["claim_refusal"] = str(err)
    r["claim_moves"] = [[str(a), str(b)] for a, b in claim(run, os.path.join(run, "checkpoints"), None, True)]
    torch.distributed.barrier()
    r["claim_after"] = sorted(n for n in os.listdir(out) if n.startswith("run"))


_RUN = {}


def launch(tmp_path_factory):
    """(output folder, per-rank results) of the 2-rank DeepSpeed launch; runs once per session."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    if "launch" not in _RUN:
        out = tmp_path_factory.mktemp("ckpt_zero")
        _RUN["out"], _RUN["launch"] = out, run_ranks(_worker, WORLD, out / "ranks", args=(str(out),))
    return _RUN["out"], _RUN["launch"].finished_results()


@pytest.fixture
def zero_run(tmp_path_factory):
    return launch(tmp_path_factory)


@pytest.mark.slow
def test_ranks_exit_cleanly(zero_run):
    _RUN["launch"].check_exits()


@pytest.mark.slow
def test_zero3_trains_the_model_as_zero2_does(zero_run):
    """ZeRO-3 gathers each module's parameters around its own forward and backward; the model reads
    parameters nowhere else, so three steps end where ZeRO-2's (whole parameters) do."""
    for r in zero_run[1]:
        assert r["z3_changed"] > 1e-3 and r["z3_vs_z2"] <= 1e-6, r


@pytest.mark.slow
def test_keep_two_and_latest(zero_run):
    out, results = zero_run
    for r in results:
        assert r["remaining"] == ["step_00000002", "step_00000003"] and r["latest"] == "step_00000003"
    meta = ckpt.validate(out / "z3" / "step_00000003")
    assert meta["world_size"] == WORLD and meta["zero_stage"] == 3 and meta["client_state"]["step"] == 3
    assert {"rng_rank00000.pt", "rng_rank00001.pt"} <= set(meta["files"]) and meta["git_revision"]


@pytest.mark.slow
def test_every_block_of_every_file_of_a_zero3_checkpoint_has_its_sha256(zero_run):
    import hashlib

    out, _ = zero_run
    path = out / "z3" / "step_00000003"
    meta = ckpt.validate(path)
    block = meta["sha256_block"]
    assert len(meta["files"]) == len([f for f in path.iterdir() if f.name != ckpt.MANIFEST])
    for rel, entry in meta["files"].items():
        data = (path / rel).read_bytes()
        blocks = [data[i:i + block] for i in range(0, len(data), block)] or [b""]
        assert entry == {"size": len(data), "sha256": [hashlib.sha256(b).hexdigest() for b in blocks]}, rel


@pytest.mark.slow
def test_resume_restores_weights_optimizer_scheduler_and_rng(zero_run):
    for r in zero_run[1]:
        assert r["resumed"] == "step_00000003" and r["client_step"] == 3
        assert r["params_vs_saved"] == 0 and r["optimizer_vs_saved"] == 0, r
        assert r["lr"][0] == r["lr"][1]
        assert r["draws_after_load"] == r["draws_after_save"]
        assert r["next_step_vs_uninterrupted"] == 0, r
    assert zero_run[1][0]["draws_after_save"] != zero_run[1][1]["draws_after_save"]  # per-rank states


@pytest.mark.slow
def test_zero3_padding_is_saved_and_loaded_as_zeros(zero_run):
    """ZeRO-3 pads the last rank's partition of a tensor of odd size (the MLM bias of 101 here)
    with uninitialised memory; whatever it holds, a save writes zeros there (the same state
    saves as the same bytes), a load restores zeros, and a step keeps them."""
    assert sum(r["padding_elements"] for r in zero_run[1]) > 0  # not vacuous
    for r in zero_run[1]:
        assert r["same_bytes"], r
        assert r["padding_after_load"] == 0 and r["padding_after_next_step"] == 0, r


@pytest.mark.slow
def test_output_folder_is_claimed_by_rank_0_for_every_rank(zero_run):
    out, results = zero_run
    refusals = [r["claim_refusal"] for r in results]
    assert refusals[0] and refusals[0] == refusals[1] and f"{out / 'run'} holds an earlier run" in refusals[0]
    assert results[0]["claim_moves"] == results[1]["claim_moves"] and len(results[0]["claim_moves"]) == 1
    aside = results[0]["claim_moves"][0][1]
    for r in results:
        assert r["claim_after"] == [os.path.basename(aside)], r  # moved once, nothing left behind
    assert (out / aside / "checkpoints" / "step_00000003" / ckpt.MANIFEST).is_file()


@pytest.mark.slow
def test_consolidated_weights_equal_live_parameters(zero_run):
    for r in zero_run[1]:
        assert r["consolidated_keys_match"] and r["consolidated_vs_live"] == 0, r
        assert r["z2_consolidated_vs_live"] == 0 and r["z2_weights_vs_saved"] == 0, r


@pytest.mark.slow
def test_incompatible_loads_are_refused_by_name(zero_run):
    for r in zero_run[1]:
        assert "ZeRO stage 3" in r["stage_refusal"] and "stage 2" in r["stage_refusal"], r
        assert "4 ranks" in r["world_refusal"] and "has 2" in r["world_refusal"], r

