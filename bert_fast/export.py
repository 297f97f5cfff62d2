"""Export a training checkpoint as a Hugging Face `BertForPreTraining` folder.

    python -m bert_fast.export <checkpoint or checkpoint root> <hf_dir> [--dtype float32|bfloat16|float16]

The checkpoint is validated (bert_fast/train/checkpoint.py), its ZeRO 1/2/3 partitions are
consolidated to full fp32 weights on the CPU, loaded strictly into our BertForPreTraining with the
config the run trained (client_state["model_config"], else the run config's model section), and
written with bert_fast.hf.export_hf. The folder appears atomically: it is written under a temporary
name beside `hf_dir` and renamed, so a crash leaves the previous export (or none), never half of
one. An existing `hf_dir` is replaced only if it is empty or an earlier export (has config.json).
Errors (missing path, invalid checkpoint) go to stderr as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from bert_fast.config import BertConfig
from bert_fast.hf import export_hf
from bert_fast.model import BertForPreTraining
from bert_fast.train.checkpoint import MANIFEST, CheckpointError, model_state_dict, validate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def replaceable(hf_dir: str | Path) -> bool:
    """Whether an export may be written to `hf_dir`: absent, empty, or an earlier export (has
    config.json). Anything else is refused, never overwritten."""
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        return True
    return hf_dir.is_dir() and (not any(hf_dir.iterdir()) or (hf_dir / "config.json").exists())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the one `latest` names in a checkpoint root."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / MANIFEST).exists() or not (path / "latest").is_file():
        return path
    tag = (path / "latest").read_text().strip()
    if not tag:
        raise CheckpointError(f"{path / 'latest'} is empty")
    return path / tag


def checkpoint_model_config(meta: dict, path: Path) -> BertConfig:
    """The config of the model actually trained (the data's vocab may have changed vocab_size)."""
    state = meta.get("client_state") or {}
    if "model_config" in state:
        return BertConfig.from_dict(state["model_config"])
    if "config" in state:
        from bert_fast.train.config import model_config

        return model_config(state["config"])
    raise CheckpointError(f"{path}: client_state holds neither 'model_config' nor 'config'")


def export_checkpoint(path: str | Path, hf_dir: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """Writes the checkpoint at `path` (or the latest under a checkpoint root) to `hf_dir`."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    hf_dir = Path(hf_dir)
    if not replaceable(hf_dir):
        raise CheckpointError(f"{hf_dir} exists and is not an earlier export; refusing to replace it")
    checkpoint = find_checkpoint(path)
    meta = validate(checkpoint)
    model = BertForPreTraining(checkpoint_model_config(meta, checkpoint))
    try:
        model.load_state_dict(model_state_dict(checkpoint), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint}: weights do not fit the recorded model config: {err}") from None
    if dtype is not None:
        model.to(dtype)

    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}.", suffix=".tmp", dir=hf_dir.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        export_hf(model, tmp)
        source = {"checkpoint": str(checkpoint.resolve()), "step": meta["step"],
                  "git_revision": meta.get("git_revision"), "dtype": str(next(model.parameters()).dtype)}
        (tmp / "bert_fast_export.json").write_text(json.dumps(source, indent=1) + "\n")
        if hf_dir.exists():
            os.rename(hf_dir, old)
        os.rename(tmp, hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return hf_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bert_fast.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (step_XXXXXXXX) or a checkpoint root")
    parser.add_argument("hf_dir", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights dtype (default: float32, as consolidated)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.hf_dir, args.dtype)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
