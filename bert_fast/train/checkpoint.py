"""Saving a training checkpoint: DeepSpeed's state plus ours, written atomically and hashed as written.

What a checkpoint folder holds, and how it is validated, is in bert_fast/train/checkpoint_manifest.py;
loading it in bert_fast/train/checkpoint_load.py.

Guarantees, assuming `root` is on a filesystem every rank sees (one node, or NFS/Lustre/GPFS):
- Atomic: every rank writes into `root/.partial/<tag>`; after every rank is done rank 0 writes the
  manifest (temp name + rename), then renames the folder to `root/<tag>` in one rename. A crash
  before that rename leaves only `.partial`, which is never considered (and removed at the next
  start, bert_fast/train/leftovers.py); a crash after it leaves a complete checkpoint. Older
  checkpoints are not touched until the new one is in place; pruning deletes a folder's manifest
  first, so a half-deleted folder reads as invalid, never as valid.
- Checked: each rank hashes the files it writes in background threads, DeepSpeed's as their bytes
  are written (their zip records' CRC32, which torch.load never checks, left out), the others once
  closed; rank 0 records every rank's digests in the manifest.
- Collective: `save` must be called by every rank; rank 0 commits and broadcasts its outcome, so
  every rank raises the same CheckpointError instead of hanging. A write that fails inside
  DeepSpeed's own save (which has collectives of its own) raises on that rank at once, naming the
  folder (and, for a full disk, the space needed and free); its peers then fail on the lost
  connection. Without torch.distributed initialised they run as world size 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from bert_fast.fileio import atomic_path, atomic_write_text
from bert_fast.ops import fp8
from bert_fast.train import checksums, dist
from bert_fast.train.checkpoint_manifest import (
    FORMAT,
    MANIFEST,
    PARTIAL,
    RNG_PREFIX,
    CheckpointError,
    checkpoints,
    read_metadata,
    rng_file,
)
from bert_fast.train.deepspeed_compat import checkpoints as ds_checkpoints
from bert_fast.train.deepspeed_compat.wrappers import full_numel
from bert_fast.train.diskspace import disk_full_message, free_bytes, is_disk_full
from bert_fast.train.partitions import zero_padding
from bert_fast.train.rng import rng_state


def save(engine, root: str | Path, step: int, client_state: dict, keep: int) -> Path:
    """Collective. Writes `root/step_{step:08d}` atomically (see the module docstring) and returns
    it. keep: how many checkpoints to leave under root, newest steps first (the one just written
    always stays); 0 keeps all. Raises CheckpointError naming the folder when any rank fails."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
    try:
        json.dumps(client_state)
    except (TypeError, ValueError) as err:
        raise TypeError(f"client_state must be JSON-serialisable: {err}") from None
    rng = rng_state()  # before anything below could draw a random number
    # Every rank's FP8 amaxes of the step into the state rank 0 writes (the loop reduced them after
    # the last backward already; MAX again changes nothing, so saving leaves the run as it was).
    if isinstance(getattr(engine, "module", None), torch.nn.Module):
        fp8.reduce_amaxes(fp8.states_of(engine.module))
    root, tag, rank = Path(root), f"step_{step:08d}", dist.rank()
    staging, final = root / PARTIAL / tag, root / tag
    if rank == 0:
        if staging.exists():  # left by a save that crashed
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    dist.barrier()
    zero_padding(engine)  # so the same state always saves as the same bytes
    with checksums.Hasher() as hasher:
        try:
            with _hashing_as_written(engine, hasher):
                engine.save_checkpoint(str(root / PARTIAL), tag=tag, client_state={}, save_latest=False)
        except Exception as err:  # DeepSpeed's save has collectives: this rank cannot rejoin its peers
            message = _write_failure(err, staging, engine)
            _discard(staging)  # its peers' writes fail too, and the run ends
            raise CheckpointError(message) from err
        try:
            digests = _finish_own_files(staging, rank, rng, hasher)
        except Exception as err:  # every rank learns of it below, or they would wait at the next barrier
            digests = _write_failure(err, staging, engine)
    outcomes = dist.all_ranks(digests)
    failed = [(r, o) for r, o in enumerate(outcomes) if isinstance(o, str)]
    if failed:
        if rank == 0:
            _discard(staging)
        raise CheckpointError(f"saving failed on rank {failed[0][0]}: {failed[0][1]}")
    error = None
    if rank == 0:
        try:
            meta = {"format": FORMAT, "step": step, "tag": tag, "world_size": dist.world(),
                    "zero_stage": int(engine.zero_optimization_stage()),
                    "deepspeed_version": _deepspeed_version(), "torch_version": torch.__version__,
                    "git_revision": _git_revision(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "client_state": client_state,
                    "param_group_names": ds_checkpoints.param_group_names(engine)}
            _commit(root, staging, final, meta, keep, {k: v for o in outcomes for k, v in o.items()})
        except Exception as err:  # every rank must learn of it, or they wait at the next barrier
            error = _write_failure(err, staging, engine)
    error = dist.from_rank0(error)
    if error is not None:
        raise CheckpointError(f"saving failed on rank 0: {error}")
    return final


def _hashing_as_written(engine, hasher: checksums.Hasher):
    """DeepSpeed's checkpoint engine writes each file through `hasher.writer`, so its bytes are
    hashed by the hasher's threads while they are written (the bytes of torch.save to a path in
    the legacy format; in the zip format its records are named archive/..., not after the file).
    Its zip format's CRC32 of each record is left out (zeros, as torch.save does with
    set_crc32_options(False)): torch.load never checks it, the sha256 covers those bytes, and it
    is computed in the writing thread, one core at ~1 GB/s, as long as the sha256 itself (BERT-large:
    4.7 GB, bench/checkpoint.py). Only DeepSpeed's default engine, which writes synchronously with
    torch.save; the files of any other are hashed once save_checkpoint returns."""
    def save(state_dict, path, zip_format: bool):
        with hasher.writer(path) as f, _without_zip_crc32():
            torch.save(state_dict, f, _use_new_zipfile_serialization=zip_format)

    return ds_checkpoints.checkpoint_writes(engine, save)


@contextlib.contextmanager
def _without_zip_crc32():
    """torch.save writes zeros for its zip records' CRC32 inside (torch >= 2.6; older ones compute it)."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _finish_own_files(staging: Path, rank: int, rng: dict, hasher: checksums.Hasher) -> dict[str, dict]:
    """This rank's RNG file, then every file it wrote made durable and hashed: {relative path:
    {"size", "sha256"}}. Files DeepSpeed wrote through the hasher are hashed already; the others
    (the RNG file, those of another checkpoint engine) are hashed while the files are fsynced."""
    # Through a file object: given a path, torch.save names the archive's records after the file,
    # here a random temporary name, and the same state saved twice differed.
    rng_path = staging / rng_file(rank)
    with atomic_path(rng_path) as tmp, open(tmp, "wb") as f:
        torch.save(rng, f)
    own = _deepspeed_files(staging, rank)
    for f in [rng_path, *own]:
        hasher.submit(f)
    for f in own:
        _fsync(f)
    folder = Path(os.path.abspath(staging))
    return {p.relative_to(folder).as_posix(): entry for p, entry in hasher.digests().items()}


def _discard(staging: Path) -> None:
    """Removes a failed save's folder (and `.partial` when empty), freeing its space at once."""
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()


def _write_failure(err: BaseException, staging: Path, engine) -> str:
    """One line: a full disk with the space needed and free, else the folder and the error. A
    full disk: an ENOSPC/EDQUOT behind the error, or (torch.save's zip writer reports it as
    'unexpected pos', no errno) less space left than the rest of the checkpoint needed."""
    free = free_bytes(staging)
    needed, source = _space_needed(staging.parent.parent, engine)
    written = _bytes_in(staging)
    if is_disk_full(err) or (free is not None and needed is not None and free + written < needed):
        return disk_full_message(staging, needed, f"checkpoint {staging.name}", free, basis=source,
                                 fix="free space there or set checkpoint.dir to another disk")
    text = " ".join(str(err).split())
    return f"writing {staging} failed: {type(err).__name__}: {text}"


def _bytes_in(folder: Path) -> int:
    """Bytes of the files under `folder` now (0 where it is gone; other ranks may be deleting)."""
    total = 0
    for f in folder.rglob("*") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def _space_needed(root: Path, engine) -> tuple[int | None, str]:
    """(bytes, how it was found): the newest readable checkpoint's size (the same run saves the
    same shapes), else an estimate from the model."""
    for _, path in reversed(checkpoints(root)):
        try:
            files = read_metadata(path)["files"]
            return sum(int(e["size"]) for e in files.values()), f"the size of {path.name}"
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue
    try:
        params = list(engine.module.parameters())
        count = sum(full_numel(p) for p in params)
        size = sum(full_numel(p) * (p.element_size() + 12) for p in params)
    except Exception:  # a failure path: never raise from here
        return None, "no earlier checkpoint to measure"
    return size, (f"estimated: {count:,} parameters with an fp32 master copy and two fp32 optimizer "
                  "moments each")


def _deepspeed_files(staging: Path, rank: int) -> list[Path]:
    """The files DeepSpeed wrote into `staging` for `rank`, which this rank makes durable and hashes:
    its ZeRO partitions and, on rank 0, those of no rank (stage 0-2 model states, zero_to_fp32.py).
    Never another rank's, which may still be written or renamed: rank 0 once opened rank 1's RNG
    file by its temporary name as rank 1 renamed it (FileNotFoundError, 1 run of the checkpoint
    tests in 20). The RNG files are made durable by atomic_path."""
    files = []
    for f in staging.iterdir():
        if f.name.startswith((".", RNG_PREFIX)) or not f.is_file():
            continue
        owner = ds_checkpoints.file_rank(f.name)
        if (owner if owner is not None else 0) == rank:
            files.append(f)
    return files


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def _commit(root: Path, staging: Path, final: Path, meta: dict, keep: int,
            digests: dict[str, dict] | None = None) -> None:
    """Rank 0: the manifest (from the ranks' `digests`; a file none of them hashed is hashed
    here), the rename into place, `latest`, pruning."""
    digests = dict(digests or {})
    present = {f.relative_to(staging).as_posix(): f for f in sorted(staging.rglob("*")) if f.is_file()}
    gone = sorted(set(digests) - set(present))
    if gone:
        raise CheckpointError(f"{staging}: {', '.join(gone)} vanished after it was written")
    todo = [f for rel, f in present.items() if rel not in digests]
    digests.update((p.relative_to(staging).as_posix(), e) for p, e in checksums.digest_files(todo).items())
    for rel, f in present.items():
        if f.stat().st_size != digests[rel]["size"]:
            raise CheckpointError(f"{staging}: {rel} changed after it was hashed")
    files = {rel: digests[rel] for rel in present}
    missing = [r for r in range(meta["world_size"]) if rng_file(r) not in files]
    if missing:
        raise CheckpointError(f"{staging}: no RNG file from ranks {missing}; is {root} shared by all ranks?")
    manifest = {**meta, "sha256_block": checksums.BLOCK, "files": files}
    atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _fsync(staging)
    replaced = root / PARTIAL / f"replaced_{final.name}"
    if final.exists():  # the same step saved again: move the old one aside, never merge
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync(root)
    shutil.rmtree(replaced, ignore_errors=True)
    with contextlib.suppress(OSError):  # empty now, unless another save of this run is under way
        (root / PARTIAL).rmdir()
    atomic_write_text(root / "latest", final.name)
    if keep:
        for _, old in checkpoints(root)[:-keep]:
            if old != final:
                (old / MANIFEST).unlink(missing_ok=True)  # invalid from here on, then delete
                shutil.rmtree(old, ignore_errors=True)
    _fsync(root)


def point_latest(root: str | Path, path: Path) -> None:
    """Rank 0, on resume: `latest` names the checkpoint resumed from (a save killed after its
    rename but before `latest` left the previous name there)."""
    latest = Path(root) / "latest"
    if not latest.is_file() or latest.read_text().strip() != path.name:
        atomic_write_text(latest, path.name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
