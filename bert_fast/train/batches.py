"""Training and held-out batches for one rank, from the `data` section of the recipe.

`data.source`: "corpus" (the embedded docstring corpus, bert_fast/data/corpus.py), a folder made by
`bert-fast data prepare`, or "synthetic" (bert_fast/data/synthetic.py; no held-out set).
`data.eval_source`: "heldout" keeps the corpus's last shard out of training and evaluates on it,
a prepared folder evaluates on that corpus, "none" turns evaluation off.

Every batch is in the packed static form (bert_fast/data/packing.py), built and checked on the
host: at most `data.buckets` shapes per run, and nothing the step has to read back from the device.

The data decides the vocab (a prepared corpus's vocab.txt fixes its size and [PAD] id, whatever
the model preset says): `Batches` says which, and `model_for_data` gives the model that reads them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bert_fast.data.corpus import default_prepared
from bert_fast.data.dataset import PretrainingDataset, PretrainingLoader
from bert_fast.data.packing import pack_full_length
from bert_fast.data.shards import PreparedCorpus
from bert_fast.data.synthetic import SyntheticBatches
from bert_fast.model.config import BertConfig
from bert_fast.train.config import data_settings
from bert_fast.train.recipe import Recipe


@dataclasses.dataclass
class Batches:
    train: object                   # PretrainingLoader or SyntheticBatches
    eval: PretrainingLoader | None  # held-out batches, or None
    vocab_size: int                 # token ids are below it: the corpus's vocab (synthetic: the model's)
    pad_id: int                     # [PAD]'s id in that vocab

    def stream(self):
        """Endless training batches (resumable through `state_dict` where the source has one)."""
        if isinstance(self.train, SyntheticBatches):
            synthetic = self.train
            return (pack_full_length(synthetic.next(), synthetic.max_predictions) for _ in iter(int, 1))
        return iter(self.train)

    def state_dict(self) -> dict:
        return self.train.state_dict() if hasattr(self.train, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if state and hasattr(self.train, "load_state_dict"):
            self.train.load_state_dict(state)


def _folder(source: str, key: str) -> Path:
    if not Path(source).is_dir():
        raise ValueError(f"{key}={source!r} must be 'corpus', 'synthetic' or a folder made by "
                         "`bert-fast data prepare` (no such folder)")
    return Path(source)


def model_for_data(model_cfg: BertConfig, batches: Batches) -> BertConfig:
    """The model that reads `batches`: `model_cfg` (the recipe's model section) with the data's
    vocab size and [PAD] id. (data.seq_length <= max_position_embeddings is validate_config's.)"""
    return dataclasses.replace(model_cfg, vocab_size=batches.vocab_size, pad_token_id=batches.pad_id)


def make_batches(recipe: Recipe, model_cfg: BertConfig, rank: int = 0, world_size: int = 1) -> Batches:
    """`model_cfg` (read only): the vocab synthetic ids are drawn from."""
    d, t = recipe.data, recipe.train
    if d.source == "synthetic":
        predictions = data_settings(recipe).predictions
        train = SyntheticBatches(t.micro_batch, d.seq_length, model_cfg.vocab_size,
                                 mask_prob=d.mask_prob, seed=t.seed * world_size + rank,
                                 max_predictions=predictions)
        return Batches(train, None, model_cfg.vocab_size, model_cfg.pad_token_id)
    if d.source == "corpus":
        folder = default_prepared(d.vocab_size)
    else:
        folder = _folder(d.source, "data.source")
    corpus = PreparedCorpus(folder)
    # The same sample settings for training and a separate eval corpus (each with its own vocab ids).
    sample = dict(max_seq_length=d.seq_length, objective=d.objective, mask_prob=d.mask_prob,
                  max_predictions=d.max_predictions, short_seq_prob=d.short_seq_prob,
                  whole_word_mask=d.whole_word_mask, seed=t.seed)
    settings = PretrainingDataset.settings_for(corpus, **sample)
    train_shards, eval_set = None, None
    if d.eval_source == "heldout" and recipe.eval.every > 0:
        if corpus.num_shards < 2:
            raise ValueError(f"data.eval_source=heldout needs a corpus of at least 2 shards to hold the last "
                             f"one out, {folder} has {corpus.num_shards}; prepare it with a smaller "
                             "--shard-tokens, give a prepared folder, or set data.eval_source=none")
        train_shards = list(range(corpus.num_shards - 1))
        eval_set = PretrainingDataset(corpus, settings, shards=[corpus.num_shards - 1])
    elif d.eval_source not in ("heldout", "none") and recipe.eval.every > 0:
        other = PreparedCorpus(_folder(d.eval_source, "data.eval_source"))
        if other.vocab_size != corpus.vocab_size:
            raise ValueError(f"data.eval_source has {other.vocab_size} words, "
                             f"data.source {corpus.vocab_size}")
        eval_set = PretrainingDataset(other, PretrainingDataset.settings_for(other, **sample))
    train = PretrainingLoader(PretrainingDataset(corpus, settings, shards=train_shards), t.micro_batch,
                              rank=rank, world_size=world_size, seed=t.seed, workers=d.workers,
                              packed=True, buckets=d.buckets)
    held_out = None
    if eval_set is not None:  # a fixed set: the same batches at every evaluation
        held_out = PretrainingLoader(eval_set, t.micro_batch, rank=rank, world_size=world_size,
                                     seed=t.seed + 1, workers=0, packed=True, buckets=d.buckets)
    return Batches(train, held_out, corpus.vocab_size, corpus.special["pad_id"])
