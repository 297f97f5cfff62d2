"""The step loop on one process: AdamW, linear warmup then linear decay, progress and logs.

This is the smoke path `make pretrain` runs on CPU today; DeepSpeed (ZeRO, mixed precision,
multi-GPU) and checkpoints replace its pieces as those issues land. Batches come from the data
pipeline (bert_fast/data: prepared shards, C++ sample builder, DataLoader workers) or, with
`data.source: synthetic`, from the synthetic topic generator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bert_fast.data.corpus import default_prepared
from bert_fast.data.dataset import PretrainingDataset, PretrainingLoader
from bert_fast.data.shards import PreparedCorpus
from bert_fast.data.synthetic import SyntheticBatches
from bert_fast.model import BertForPreTraining
from bert_fast.train.config import model_config


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm parameters, as in BERT."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_batches(config: dict, model_cfg):
    """(an endless batch iterator, the model config with the data's vocab) for `config["data"]`."""
    d, t = config["data"], config["train"]
    if d["source"] == "synthetic":
        batches = SyntheticBatches(t["micro_batch"], d["seq_length"], model_cfg.vocab_size,
                                   mask_prob=d["mask_prob"], seed=t["seed"])
        return iter(batches.next, None), model_cfg
    if d["source"] == "corpus":
        folder = default_prepared(d["vocab_size"])
    elif Path(d["source"]).is_dir():
        folder = Path(d["source"])
    else:
        raise ValueError(f"data.source={d['source']!r} must be 'corpus', 'synthetic' or a prepared folder")
    corpus = PreparedCorpus(folder)
    settings = PretrainingDataset.settings_for(
        corpus, max_seq_length=d["seq_length"], objective=d["objective"], mask_prob=d["mask_prob"],
        max_predictions=d["max_predictions"], short_seq_prob=d["short_seq_prob"],
        whole_word_mask=d["whole_word_mask"], seed=t["seed"])
    loader = PretrainingLoader(PretrainingDataset(corpus, settings), t["micro_batch"], seed=t["seed"],
                               workers=d["workers"])
    model_cfg = dataclasses.replace(model_cfg, vocab_size=corpus.vocab_size,
                                    pad_token_id=corpus.special["pad_id"])
    return iter(loader), model_cfg


def train(config: dict, log_file=None) -> list[dict]:
    """Runs `train.steps` steps; returns the logged records (also printed as JSON lines)."""
    t = config["train"]
    torch.manual_seed(t["seed"])
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    batches, model_cfg = make_batches(config, model_config(config))
    model = BertForPreTraining(model_cfg).train()
    optimizer = torch.optim.AdamW(param_groups(model, t["weight_decay"]), lr=t["lr"],
                                  betas=(0.9, 0.999), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t["warmup_steps"], t["steps"]))

    records, window, start = [], [], time.perf_counter()
    bar = tqdm(range(t["steps"]), desc="pretrain", unit="step", dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        batch = next(batches)
        out = model(**batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"step {step}: loss is {out.loss.item()}; stopping")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append([out.loss.item(), out.mlm_loss.item(), out.nsp_loss.item(),
                       out.mlm_accuracy.item(), out.nsp_accuracy.item()])
        if (step + 1) % t["log_every"] == 0 or step + 1 == t["steps"]:
            elapsed = time.perf_counter() - start
            mean = [sum(col) / len(window) for col in zip(*window)]
            record = {"step": step + 1, "loss": mean[0], "mlm_loss": mean[1], "nsp_loss": mean[2],
                      "mlm_acc": mean[3], "nsp_acc": mean[4], "lr": schedule.get_last_lr()[0],
                      "seq_per_s": len(window) * t["micro_batch"] / elapsed}
            records.append(record)
            bar.set_postfix(loss=f"{mean[0]:.3f}", mlm_acc=f"{mean[3]:.2f}",
                            seq_s=f"{record['seq_per_s']:.0f}")
            line = json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()})
            tqdm.write(line, file=log_file)
            window, start = [], time.perf_counter()
    if not math.isfinite(records[-1]["loss"]):
        raise FloatingPointError("final loss is not finite")
    return records
