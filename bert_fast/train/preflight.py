"""Checks made before training starts, on every rank, so that a bad setting fails at once with a
message naming it (exit 2) instead of hours later on one rank while the others hang.

Checkpoints to resume or initialise from are resolved (and hashed) on rank 0 only; the path and
its metadata are broadcast, and every rank compares them with this run and raises the same error.
"""

from __future__ import annotations

from pathlib import Path

from bert_fast.train import checkpoint_manifest, dist
from bert_fast.train.checkpoint_manifest import CheckpointError
from bert_fast.train.config import saved_recipe
from bert_fast.train.recipe import PrecisionSection

# BertConfig fields that decide the parameters' shapes (or what they compute): a checkpoint that
# differs in any of them cannot be loaded into this run's model.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "hidden_act")


def check_export_dir(hf_dir: str) -> None:
    """export.hf_dir must be replaceable at the end (bert_fast/train/export.py's rule: absent, empty, or
    an earlier export with config.json); checked before training, not after it."""
    from bert_fast.train.export import replaceable

    if hf_dir and not replaceable(hf_dir):
        raise ValueError(f"export.hf_dir={hf_dir} exists and is neither empty nor an earlier export "
                         "(no config.json); the export at the end would refuse to replace it")


def _check_nothing_later(root: Path, path: Path, step: int) -> None:
    """Resuming from an older checkpoint of this run's folder (a rollback) would save a second
    history beside the later checkpoints: `latest` would name the new one while --resume auto
    took the later step, and checkpoint.keep would count both."""
    later = [p.name for s, p in checkpoint_manifest.checkpoints(root)
             if s > step and (p / checkpoint_manifest.MANIFEST).is_file()]
    if later:
        raise CheckpointError(f"--resume {path}: {root} holds later checkpoints ({', '.join(later)}); this "
                              "run would save its own beside them. Resume the newest with --resume auto, or "
                              f"move the later ones out of {root} first")


def _find(root: Path, resume: str | None, init_from: str | None):
    """(kind, path, metadata) on rank 0; kind 'resume', 'init_from' or None."""
    if resume:
        path = checkpoint_manifest.resolve_resume(root, resume)
        if path is not None:
            meta = checkpoint_manifest.read_metadata(path)
            if resume != "auto":  # 'auto' takes the newest valid one; later ones are damaged
                _check_nothing_later(root, path, meta["step"])
            return "resume", path, meta
        return None, None, None  # 'auto' without a checkpoint: from scratch (or init_from below)
    if init_from:
        path = Path(init_from)
        if not (path / checkpoint_manifest.MANIFEST).exists():
            path = checkpoint_manifest.resolve_resume(path, "auto")
            if path is None:
                raise CheckpointError(f"checkpoint.init_from={init_from}: no valid checkpoint there")
        else:
            checkpoint_manifest.validate(path)
        return "init_from", path, checkpoint_manifest.read_metadata(path)
    return None, None, None


def find_start(root: Path, resume: str | None, init_from: str | None):
    """Collective. (kind, path, metadata) of the checkpoint this run starts from, resolved on
    rank 0 and broadcast; kind None: from scratch. With `--resume auto` and no checkpoint yet,
    init_from applies (the first launch of a phase-2 job that is later requeued)."""
    found, error = (None, None, None), None
    if dist.rank() == 0:
        try:
            found = _find(root, resume, None)
            if found[0] is None and init_from:
                found = _find(root, None, init_from)
        except CheckpointError as err:
            error = str(err)
    found, error = dist.from_rank0((found, error))
    if error is not None:
        raise CheckpointError(error)
    return found


def _fp8_history(precision: PrecisionSection) -> int | None:
    """The length of the FP8 amax histories a run's module holds (bert_fast/ops/fp8.py), None for none:
    only delayed scaling has that state."""
    if precision.fp8 and precision.fp8_scaling == "delayed":
        return precision.fp8_amax_history
    return None


def _fp8_described(precision: PrecisionSection) -> str:
    length = _fp8_history(precision)
    return ("no FP8 scaling state" if length is None else
            f"precision.fp8_scaling=delayed, precision.fp8_amax_history={length}")


def check_start(kind: str, path: Path, meta: dict, model_cfg, steps: int, global_batch: int,
                precision: PrecisionSection | None = None) -> None:
    """Every rank: the checkpoint must fit this run's model, and a resumed one its batch, steps and
    FP8 scaling state (`precision`, this run's precision section; None skips that check)."""
    from bert_fast.train.export import checkpoint_model_config

    saved = checkpoint_model_config(meta, path).to_dict()
    ours = model_cfg.to_dict()
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {ours.get(k)!r}"
              for k in SHAPE_FIELDS if saved.get(k) != ours.get(k)]
    if differ:
        what = "--resume" if kind == "resume" else "checkpoint.init_from"
        raise CheckpointError(f"{path}: its model does not fit this run's ({'; '.join(differ)}); "
                              f"{what} needs the same model")
    if kind != "resume":
        return
    state = meta.get("client_state") or {}
    if "global_batch" in state and state["global_batch"] != global_batch:
        raise CheckpointError(f"{path}: saved with global batch {state['global_batch']}, this run's "
                              f"train.global_batch is {global_batch}; the data position and schedule "
                              "would not continue the run (set train.global_batch to match)")
    saved = state.get("config") or {}
    if precision is not None and "precision" in saved:  # a checkpoint's keys it lacks take the defaults
        saved_precision = saved_recipe(saved, path).precision
        if _fp8_history(saved_precision) != _fp8_history(precision):
            raise CheckpointError(f"{path}: saved with {_fp8_described(saved_precision)}, this run has "
                                  f"{_fp8_described(precision)}; a resumed run needs the same FP8 scaling "
                                  "state (set precision.fp8, fp8_scaling, fp8_amax_history as it had them)")
    if meta["step"] > steps:  # at train.steps, a resume finishes the run (fingerprints, export)
        raise ValueError(f"{path} is at step {meta['step']}, past train.steps={steps}: nothing left to "
                         "train (raise train.steps to continue)")
