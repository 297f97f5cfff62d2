"""Shared test helpers: the Hugging Face reference model, a padded batch and its packed form, error
measures."""

from __future__ import annotations

import collections
import contextlib
import os
import sys

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from bert_fast import BertConfig
from bert_fast.model.hf import config_to_hf, to_hf_state_dict


def hf_reference(model) -> transformers.BertForPreTraining:
    """A transformers BertForPreTraining with our model's weights, on the eager (math) attention
    path so the oracle shares no attention code with us."""
    values = {k: v for k, v in config_to_hf(model.config).items() if k != "architectures"}
    reference = transformers.BertForPreTraining(
        transformers.BertConfig(**values, attn_implementation="eager"))
    missing, unexpected = reference.load_state_dict(
        to_hf_state_dict(model.state_dict(), model.config), strict=False)
    # The decoder weight is tied to the word embeddings, so loading those loads it.
    assert missing == ["cls.predictions.decoder.weight"] and not unexpected, (missing, unexpected)
    assert reference.cls.predictions.decoder.weight is reference.bert.embeddings.word_embeddings.weight
    return reference.to(next(model.parameters()).dtype)


def padded_batch(config: BertConfig, lengths: list[int], seq: int, mask_prob=0.3, seed=0):
    """Random tokens with real lengths `lengths` padded to `seq`; labels only on real tokens."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    attention_mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = torch.randint(1, config.vocab_size, (batch, seq), generator=g) * attention_mask
    token_type_ids = (torch.arange(seq)[None, :] >= torch.tensor(lengths)[:, None] // 2).long()
    token_type_ids = token_type_ids * attention_mask
    chosen = (torch.rand(batch, seq, generator=g) < mask_prob) & attention_mask.bool()
    chosen[:, 0] = True  # every row predicts at least one token (position 0 is always real)
    mlm_labels = torch.where(chosen, torch.randint(0, config.vocab_size, (batch, seq), generator=g),
                             torch.full((batch, seq), -100))
    next_sentence_label = torch.randint(0, 2, (batch,), generator=g)
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                mlm_labels=mlm_labels, next_sentence_label=next_sentence_label)


def mlm_batch(vocab: int = 256, batch: int = 4, seq: int = 32, mask_prob: float = 0.2, seed: int = 0) -> dict:
    """Unpadded random ids (no special tokens below 5) with about `mask_prob` of the positions
    labelled with their own id, position 1 always: every row predicts at least one token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    labels = torch.where(torch.rand(batch, seq, generator=g) < mask_prob, ids, torch.full_like(ids, -100))
    labels[:, 1] = ids[:, 1]
    return dict(input_ids=ids, mlm_labels=labels, next_sentence_label=torch.randint(0, 2, (batch,), generator=g))


def packed_from_padded(batch: dict, filler: int, empty_slots: int) -> dict:
    """The packed form of a padded batch, built row by row: real tokens back to back, `filler`
    pad rows after them, `empty_slots` empty sequences at the end, one MLM slot per label plus
    three unused ones."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    ids, types, positions, labels, starts = [], [], [], [], []
    for b, n in enumerate(lengths):
        starts.append(len(ids))
        for s in range(n):
            if batch["mlm_labels"][b, s] != -100:
                positions.append(len(ids))
                labels.append(int(batch["mlm_labels"][b, s]))
            ids.append(int(batch["input_ids"][b, s]))
            types.append(int(batch["token_type_ids"][b, s]))
    real = len(ids)
    cu = [*starts, real] + [real] * empty_slots
    return dict(input_ids=torch.tensor(ids + [0] * filler), token_type_ids=torch.tensor(types + [0] * filler),
                cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=batch["input_ids"].shape[1],
                mlm_positions=torch.tensor(positions + [0, real - 1, 0]),
                mlm_labels=torch.tensor(labels + [-100] * 3),
                next_sentence_label=torch.cat([batch["next_sentence_label"],
                                               torch.full((empty_slots,), -100)]))


def gradient_errors(reference: torch.nn.Module, model: torch.nn.Module) -> dict[str, float]:
    """Per parameter of two copies of a model: |model's grad - reference's| / |reference's|, in norm."""
    return {name: ((got.grad - want.grad).norm() / want.grad.norm()).item()
            for (name, want), got in zip(reference.named_parameters(), model.parameters())}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: error relative to the tensor's scale."""
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / max(scale, torch.finfo(torch.float32).tiny)


@contextlib.contextmanager
def count_launches_and_syncs(*kernel_modules):
    """Counts, inside the block, the Triton launches of the given kernel modules (through their
    `_launch`) and the device-to-host syncs: `aten._local_scalar_dense` (what .item() and bool()
    run), `aten.nonzero`, and Tensor.tolist (which reads a CPU tensor without the dispatcher).
    Yields the dict of counts, filled on exit."""
    counts = {"launches": 0, "syncs": 0}
    originals = [(m, m._launch) for m in kernel_modules]

    def counting(original):
        def launch(kernel, grid, traced=False):
            counts["launches"] += 1
            return original(kernel, grid, traced)
        return launch

    class Syncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
                counts["syncs"] += 1
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counts["syncs"] += 1  # a device->host copy on CUDA; CPU tensors skip the dispatcher here
        return tolist(self)

    for module, original in originals:
        module._launch = counting(original)
    torch.Tensor.tolist = counted_tolist
    try:
        # The interpreter runs a kernel through torch ops of its own: syncs count ours only.
        with Syncs():
            yield counts
    finally:
        torch.Tensor.tolist = tolist
        for module, original in originals:
            module._launch = original


class KernelCensus(TorchDispatchMode):
    """Counts, inside the block, what would launch GPU work: aten ops that run kernels (not views,
    not allocations) by op name (`aten`, e.g. "mm") and Triton launches by kernel name (`triton`,
    the interpreter's runs). The interpreter runs a kernel through tensor ops of its own: those
    are not counted."""

    NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.aten, self.triton, self.inside = collections.Counter(), collections.Counter(), 0

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._real = real = InterpretedFunction.run

        def run(kernel, *args, **kwargs):
            self.triton[kernel.fn.__name__] += 1
            self.inside += 1
            try:
                return real(kernel, *args, **kwargs)
            finally:
                self.inside -= 1

        InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._real
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        alias = func._schema.returns[0].alias_info if func._schema.returns else None
        name = func.overloadpacket.__name__
        if not self.inside and not (alias is not None and not alias.is_write) and name not in self.NO_LAUNCH:
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


def trace_with_fake_tensors(script: str) -> str:
    """Runs `script` (which prints a make_fx graph's code) in a fresh process with the Triton
    interpreter off and returns its output. torch.compile and export trace with fake tensors first,
    which the interpreter cannot run (it reads data pointers); with it off no kernel runs at all."""
    import early  # its run: killed with the session, as early jobs (most callers) need

    env = dict(early.environ(), TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))
    done = early.run([sys.executable, "-c", script], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
