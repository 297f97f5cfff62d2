"""Export a training checkpoint as a Hugging Face folder: `BertForPreTraining` and its tokenizer.

    bert-fast export <checkpoint or checkpoint root> <hf_dir> [--dtype float32|bfloat16|float16]
                               [--data <prepared folder>]

The checkpoint is validated first (bert_fast/train/checkpoint_manifest.py: every byte of every file against
the sha256 of its 64 MiB block in the manifest), its ZeRO 1/2/3 partitions are
consolidated to full fp32 weights on the CPU, loaded strictly into our BertForPreTraining with the
config the run trained (client_state["model_config"], else the run config's model section), and
written with bert_fast.model.hf.export_hf. The run's tokenizer goes beside it (vocab.txt, tokenizer.json,
tokenizer_config.json, special_tokens_map.json; bert_fast/data/hf_tokenizer.py): the vocab and
lower-casing of the prepared folder the run trained on, found from the run config's data.source
(a prepared folder, or the embedded corpus prepared with data.vocab_size) or named by --data, and
checked against the model's vocab size and padding id. A run on synthetic ids has no tokenizer.
The folder appears atomically: it is written under a temporary name beside `hf_dir` and renamed,
so a crash leaves the previous export (or none), never half of one; its files get the mode a
plain write gives (0644 under the usual umask). An existing `hf_dir` is replaced only if it is
empty or an earlier export (has config.json). The command prints what it wrote; errors (missing
path, invalid checkpoint, no vocab found) go to stderr as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from bert_fast.data.hf_tokenizer import write_hf_tokenizer
from bert_fast.data.shards import PreparedCorpus
from bert_fast.model import BertForPreTraining
from bert_fast.model.config import BertConfig
from bert_fast.model.hf import export_hf
from bert_fast.train.checkpoint_load import model_state_dict
from bert_fast.train.checkpoint_manifest import MANIFEST, CheckpointError, validate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INFO = "bert_fast_export.json"  # what the export came from: checkpoint, step, dtype, tokenizer
log = logging.getLogger(__name__)


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
        from bert_fast.train.config import model_config, saved_recipe

        return model_config(saved_recipe(state["config"], path))
    raise CheckpointError(f"{path}: client_state holds neither 'model_config' nor 'config'")


def run_corpus(meta: dict, checkpoint: Path, data: str | Path | None = None) -> PreparedCorpus | None:
    """The prepared folder whose vocab the run trained with: `data` when given, else the run
    config's data.source (a folder, or the embedded corpus prepared with data.vocab_size). None
    for a run on synthetic ids, which have no vocab."""
    if data is None:
        from bert_fast.train.config import saved_recipe

        saved = (meta.get("client_state") or {}).get("config") or {}
        if "source" not in (saved.get("data") or {}):  # not a default: the run's own
            raise CheckpointError(f"{checkpoint}: its run config records no data.source, so its vocab is "
                                  "unknown; name the prepared folder it trained on with --data")
        recipe = saved_recipe(saved, checkpoint)
        source = recipe.data.source
        if source == "synthetic":
            return None
        if source == "corpus":
            from bert_fast.data.corpus import prepared_folder

            folder = prepared_folder(recipe.data.vocab_size)
        else:
            folder = Path(source)
        named = f"data.source={source!r} in the run config of {checkpoint}"
    else:
        folder, named = Path(data), "--data"
    try:
        return PreparedCorpus(folder, verify=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"the run's vocab ({named}): {err}; name the prepared folder the run "
                              "trained on with --data") from None


def _check_vocab(corpus: PreparedCorpus, config: BertConfig) -> None:
    if corpus.vocab_size != config.vocab_size or corpus.special["pad_id"] != config.pad_token_id:
        raise CheckpointError(f"{corpus.vocab_path} has {corpus.vocab_size} words and [PAD] id "
                              f"{corpus.special['pad_id']}, the model {config.vocab_size} and "
                              f"{config.pad_token_id}: it is not the vocab this run trained with")


def export_checkpoint(path: str | Path, hf_dir: str | Path, dtype: str | torch.dtype | None = None,
                      data: str | Path | None = None) -> Path:
    """Writes the checkpoint at `path` (or the latest under a checkpoint root) and its run's
    tokenizer (that of the prepared folder `data`, when given) to `hf_dir`."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    hf_dir = Path(hf_dir)
    if not replaceable(hf_dir):
        raise CheckpointError(f"{hf_dir} exists and is not an earlier export; refusing to replace it")
    checkpoint = find_checkpoint(path)
    meta = validate(checkpoint)
    config = checkpoint_model_config(meta, checkpoint)
    corpus = run_corpus(meta, checkpoint, data)
    if corpus is not None:
        _check_vocab(corpus, config)
    model = BertForPreTraining(config)
    try:
        model.load_state_dict(model_state_dict(checkpoint, validated=meta), strict=True)  # hashed once
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint}: weights do not fit the recorded model config: {err}") from None
    if dtype is not None:
        model.to(dtype)

    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir, not mkdtemp: the folder gets the umask's mode, as save_pretrained's does, not 0700.
    tmp = hf_dir.parent / f".{hf_dir.name}.{uuid.uuid4().hex}.tmp"
    os.mkdir(tmp)
    old = tmp.with_name(tmp.name + ".old")
    try:
        export_hf(model, tmp)
        if corpus is None:
            tokenizer = "none: the run trained on synthetic token ids, which have no vocab"
            log.warning("%s: no tokenizer exported (%s)", hf_dir, tokenizer)
        else:
            lowercase = bool(corpus.manifest["settings"]["lowercase"])
            write_hf_tokenizer(corpus.vocab_path, lowercase, tmp, config.max_position_embeddings)
            tokenizer = {"vocab": str(corpus.vocab_path.resolve()), "words": corpus.vocab_size,
                         "sha256": corpus.manifest["vocab"]["sha256"], "lowercase": lowercase}
        source = {"checkpoint": str(checkpoint.resolve()), "step": meta["step"],
                  "git_revision": meta.get("git_revision"), "dtype": str(next(model.parameters()).dtype),
                  "tokenizer": tokenizer}
        (tmp / INFO).write_text(json.dumps(source, indent=1) + "\n")
        if hf_dir.exists():
            os.rename(hf_dir, old)
        os.rename(tmp, hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return hf_dir


def describe(hf_dir: Path) -> str:
    """What an export holds: its files with their sizes, what it came from, and its tokenizer."""
    info = json.loads((hf_dir / INFO).read_text())
    lines = [f"wrote {hf_dir} from step {info['step']} of {info['checkpoint']} ({info['dtype']}):"]
    lines += [f"  {f.name:<24} {f.stat().st_size:>13,} bytes" for f in sorted(hf_dir.iterdir())]
    tokenizer = info["tokenizer"]
    if isinstance(tokenizer, dict):
        case = "lower-cased, accents stripped" if tokenizer["lowercase"] else "cased"
        lines.append(f"tokenizer: {tokenizer['words']} words ({case}) from {tokenizer['vocab']}")
    else:
        lines.append(f"tokenizer: {tokenizer}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m bert_fast.train.export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (step_XXXXXXXX) or a checkpoint root")
    parser.add_argument("hf_dir", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights dtype (default: float32, as consolidated)")
    parser.add_argument("--data", default=None,
                        help="the prepared folder whose vocab the run trained with (default: the run "
                             "config's data.source)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.hf_dir, args.dtype, args.data)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
