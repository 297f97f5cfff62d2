"""Dataset, distributed sampler, collate and the loader that feeds the training loop.

`PretrainingDataset` plans every shard for an epoch (C++ builder, ~40 bytes per sample) and fills
samples on demand, a batch at a time (`__getitems__`, so a DataLoader worker builds a whole batch
in one C++ call). `ResumableSampler` splits a per-epoch permutation across ranks: disjoint and
complete for any (rank, world_size), resumable from a consumed-samples count. `collate` pads to
the longest sequence of the batch (the padded `BertForPreTraining.forward` contract);
bert_fast/data/packing.py's `StaticCollate` builds the packed static batch training runs on (a
few fixed shapes, no host sync on the device). `PretrainingLoader` ties them together over epochs
and keeps the position that goes into checkpoints.
"""

from __future__ import annotations

import signal
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bert_fast.data import builder, packing
from bert_fast.data.rng import DOMAIN_SHARD, stream_key
from bert_fast.data.settings import SampleSettings
from bert_fast.data.shards import PreparedCorpus
from bert_fast.labels import IGNORE_INDEX


class PretrainingDataset(Dataset):
    """Samples of one epoch of a prepared corpus. Masks are keyed by (seed, epoch, sample index),
    so a sample is the same whichever rank, worker or batch builds it."""

    def __init__(self, corpus: PreparedCorpus | str, settings: SampleSettings, epoch: int = 0,
                 backend: str = "cpp", threads: int = 1, shards=None):
        """shards: indices of the corpus's shards to draw from (default all), e.g. all but the
        last for training and the last for held-out evaluation."""
        self.corpus = corpus if isinstance(corpus, PreparedCorpus) else PreparedCorpus(corpus)
        vocab = self.corpus.vocab_size
        if settings.vocab_size != vocab:
            raise ValueError(f"settings.vocab_size={settings.vocab_size}, but the corpus has {vocab} words")
        self.settings, self.backend, self.threads = settings, backend, threads
        indices = list(range(self.corpus.num_shards)) if shards is None else [int(i) for i in shards]
        if not indices or any(not 0 <= i < self.corpus.num_shards for i in indices):
            raise ValueError(f"shards must be a non-empty list of indices in [0, {self.corpus.num_shards}), "
                             f"got {shards!r}")
        self.shard_ids = indices
        self.shards = [self.corpus.shard(i) for i in indices]
        self.doc_starts = [s.doc_starts for s in self.shards]
        self.epoch = None
        self.set_epoch(epoch)

    @classmethod
    def settings_for(cls, corpus: PreparedCorpus, **kwargs) -> SampleSettings:
        """SampleSettings with the corpus's vocab size and special token ids."""
        ids = {k: v for k, v in corpus.special.items() if k != "unk_id"}
        return SampleSettings(vocab_size=corpus.vocab_size, **ids, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.plans = [builder.plan(np.asarray(s.sentences), np.asarray(s.documents), self._plan_settings(i),
                                   epoch, self.backend, threads=0) for i, s in enumerate(self.shards)]
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.plans])]).astype(np.int64)
        self.epoch = epoch

    def lengths(self, epoch: int | None = None) -> np.ndarray:
        """Every sample's token count in `epoch` (this one by default), from the plans alone."""
        plans = self.plans if epoch in (None, self.epoch) else [
            builder.plan(np.asarray(s.sentences), np.asarray(s.documents), self._plan_settings(i), epoch,
                         self.backend, threads=0) for i, s in enumerate(self.shards)]
        return np.concatenate([builder.plan_lengths(p, self.settings, d)
                               for p, d in zip(plans, self.doc_starts)])

    def _plan_settings(self, shard: int) -> SampleSettings:
        """Planning draws are keyed by the document's index in its shard, so every shard plans with
        its own seed; with one seed, document d of every shard would draw the same stream (same
        short-target choice, same random-next decisions)."""
        shard = self.shard_ids[shard]  # the corpus's index: a subset plans each shard as the whole does
        return replace(self.settings, seed=stream_key(self.settings.seed, 0, shard, DOMAIN_SHARD) >> 1)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitems__(self, indices) -> dict[str, np.ndarray]:
        keys = np.asarray(indices, dtype=np.int64)
        if keys.ndim != 1 or (len(keys) and (keys.min() < 0 or keys.max() >= len(self))):
            raise IndexError(f"sample indices must lie in [0, {len(self)})")
        out = builder.allocate(len(keys), self.settings)
        shard_of = np.searchsorted(self.offsets, keys, side="right") - 1
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            s = self.shards[shard]
            builder.fill(s.tokens, s.word_starts, self.doc_starts[shard],
                         self.plans[shard][keys[rows] - self.offsets[shard]], keys[rows], rows, self.settings,
                         self.epoch, out, self.backend, self.threads)
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class ResumableSampler(Sampler[int]):
    """This rank's sample indices for one epoch: a seeded permutation of [0, size), positions
    consumed, consumed + 1, ... dealt round-robin to the ranks. The tail is padded with the first
    indices (as torch's DistributedSampler does) so every rank gets the same count; with
    `consumed` set, the stream restarts exactly where a run with the same global order stopped."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, consumed: int = 0):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.epoch, self.consumed = epoch, 0
        self.load_state_dict({"epoch": epoch, "consumed": consumed, "seed": seed})

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size).astype(np.int64)

    def __len__(self) -> int:
        return -(-(self.size - self.consumed) // self.world_size)

    def __iter__(self):
        rest = self.order()[self.consumed:]
        padded = len(self) * self.world_size
        if padded > len(rest):
            rest = np.concatenate([rest, np.resize(self.order(), padded - len(rest))])
        return iter(rest[self.rank::self.world_size].tolist())

    def set_epoch(self, epoch: int, size: int | None = None) -> None:
        self.epoch, self.consumed = epoch, 0
        if size is not None:
            self.size = size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        consumed = state["consumed"]
        if not isinstance(consumed, int) or not 0 <= consumed <= self.size:
            raise ValueError(f"consumed must be an int in [0, {self.size}], got {consumed!r}")
        self.epoch, self.consumed = state["epoch"], consumed


def _padded_length(lengths: np.ndarray, multiple: int) -> int:
    longest = int(lengths.max())
    return -(-longest // multiple) * multiple


def collate(arrays: dict[str, np.ndarray], pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Builder output -> BertForPreTraining.forward's batch, padded to the longest sequence
    (rounded up to `pad_to_multiple_of`, never past max_seq_length). mlm_labels is -100 except
    at the masked positions."""
    lengths = arrays["lengths"]
    width = min(arrays["input_ids"].shape[1], _padded_length(lengths, pad_to_multiple_of))
    input_ids = torch.from_numpy(arrays["input_ids"][:, :width].astype(np.int64))
    labels = np.full((len(lengths), width), IGNORE_INDEX, dtype=np.int64)
    rows, cols = np.nonzero(arrays["mlm_labels"] != IGNORE_INDEX)
    labels[rows, arrays["mlm_positions"][rows, cols]] = arrays["mlm_labels"][rows, cols]
    return {
        "input_ids": input_ids,
        "token_type_ids": torch.from_numpy(arrays["token_type_ids"][:, :width].astype(np.int64)),
        "attention_mask": (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long(),
        "mlm_labels": torch.from_numpy(labels),
        "next_sentence_label": torch.from_numpy(arrays["nsp_label"].astype(np.int64)),
    }


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: SIGINT/SIGTERM sent to the whole process group (Ctrl-C, SLURM's
    scancel) must not kill the workers; the main process handles them (finishes the step, saves,
    exits) and ends its workers itself. Module level so it pickles for any start method."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class PretrainingLoader:
    """Batches for one rank over successive epochs, built by DataLoader workers ahead of the
    training step (`workers` processes, `prefetch` batches each; pinned memory on CUDA).
    `state_dict()` is the position after the last batch handed out; loading it resumes there."""

    def __init__(self, dataset: PretrainingDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 0, prefetch: int = 4, packed: bool = False,
                 buckets: int = 8, pin_memory: bool | None = None):
        """packed: the static packed batches of bert_fast/data/packing.py, in at most `buckets`
        shapes chosen from this rank's first epoch; else padded batches (`collate`)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.dataset, self.batch_size, self.workers, self.prefetch = dataset, batch_size, workers, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.sampler = ResumableSampler(len(dataset), rank, world_size, seed, epoch=dataset.epoch)
        self.collate = collate
        if packed:
            # From a fresh sampler of this epoch: the same buckets whatever position a run resumes at.
            order = np.fromiter(iter(ResumableSampler(len(dataset), rank, world_size, seed,
                                                      epoch=dataset.epoch)), dtype=np.int64)
            settings = dataset.settings
            totals = packing.likely_totals(dataset.lengths(), order, batch_size, seed=seed,
                                           more=dataset.lengths(dataset.epoch + 1))
            chosen = packing.choose_buckets(totals, batch_size * settings.max_seq_length, buckets)
            self.collate = packing.StaticCollate(batch_size, settings, chosen)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.set_epoch(state["epoch"])
        self.sampler.set_epoch(state["epoch"], len(self.dataset))
        self.sampler.load_state_dict(state)

    def __iter__(self):
        """Endless: epoch after epoch, each re-planned (new pairs and masks)."""
        while True:
            # Its own generator: a DataLoader otherwise draws its base seed from torch's global RNG
            # each time it starts, which would shift the dropout draws of a resumed run.
            generator = torch.Generator().manual_seed(self.sampler.seed + self.sampler.epoch)
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                                collate_fn=self.collate, num_workers=self.workers, pin_memory=self.pin_memory,
                                prefetch_factor=self.prefetch if self.workers else None, drop_last=False,
                                generator=generator, worker_init_fn=ignore_stop_signals)
            for batch in loader:
                samples = batch.get("sequences", len(batch["next_sentence_label"]))
                self.sampler.consumed = min(self.sampler.size,
                                            self.sampler.consumed + samples * self.sampler.world_size)
                yield batch
            epoch = self.sampler.epoch + 1
            self.dataset.set_epoch(epoch)
            self.sampler.set_epoch(epoch, len(self.dataset))
