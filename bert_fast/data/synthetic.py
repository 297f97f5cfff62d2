"""Synthetic pretraining batches with learnable structure, for smoke runs and tests.

Each sequence is `[CLS] A [SEP] B [SEP]`. Segment A draws its tokens from one "topic" (a small
block of the vocabulary); B draws from the same topic (NSP label 0, "is next") or from another
one (label 1, "random next"). A masked token is predictable from the topic of its neighbours
(ideal MLM loss ln(topic_size) against ln(vocab) at the start) and NSP from comparing the two
segments, so a model that trains correctly drives both losses down; random tokens could not
show that. Masking follows BERT: 15% of non-special tokens, 80% [MASK], 10% random, 10% kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bert_fast.labels import IGNORE_INDEX

CLS, SEP, MASK = 101, 102, 103  # BERT uncased special token ids
FIRST_TOKEN = 1000               # topic t uses ids FIRST_TOKEN + t * topic_size + [0, topic_size)


@dataclass
class SyntheticBatches:
    batch_size: int
    seq_length: int
    vocab_size: int = 30522
    topics: int = 16
    topic_size: int = 8
    mask_prob: float = 0.15
    seed: int = 0
    max_predictions: int = 0  # > 0: at most this many masked tokens per row (the first ones drawn)

    def __post_init__(self):
        if self.seq_length < 5:
            raise ValueError(f"seq_length must be >= 5 for [CLS] A [SEP] B [SEP], got {self.seq_length}")
        if FIRST_TOKEN + self.topics * self.topic_size > self.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} is too small for {self.topics} topics "
                             f"of {self.topic_size} tokens from id {FIRST_TOKEN}")
        if not isinstance(self.max_predictions, int) or self.max_predictions < 0:
            raise ValueError(f"max_predictions must be an int >= 0, got {self.max_predictions!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def _rand(self, *shape, high: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.generator)

    def next(self) -> dict[str, torch.Tensor]:
        b, s = self.batch_size, self.seq_length
        len_a = (s - 3) // 2
        topic_a = self._rand(b, 1, high=self.topics)
        is_random = self._rand(b, high=2)
        # A different topic for "random next": shift by 1..topics-1 so it never equals topic_a.
        other = (topic_a + 1 + self._rand(b, 1, high=self.topics - 1)) % self.topics
        topic_b = torch.where(is_random[:, None].bool(), other, topic_a)
        word = self._rand(b, s - 3, high=self.topic_size)
        topic = torch.cat([topic_a.expand(b, len_a), topic_b.expand(b, s - 3 - len_a)], dim=1)
        body = FIRST_TOKEN + topic * self.topic_size + word

        col = lambda v: torch.full((b, 1), v)  # noqa: E731
        input_ids = torch.cat([col(CLS), body[:, :len_a], col(SEP), body[:, len_a:], col(SEP)], 1)
        token_type_ids = torch.zeros(b, s, dtype=torch.long)
        token_type_ids[:, len_a + 2:] = 1
        special = (input_ids == CLS) | (input_ids == SEP)

        chosen = (torch.rand(b, s, generator=self.generator) < self.mask_prob) & ~special
        if self.max_predictions:
            chosen &= chosen.cumsum(1) <= self.max_predictions
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        action = torch.rand(b, s, generator=self.generator)
        replaced = torch.where(action < 0.8, torch.full_like(input_ids, MASK),
                               self._rand(b, s, high=self.vocab_size))
        input_ids = torch.where(chosen & (action < 0.9), replaced, input_ids)
        return {"input_ids": input_ids, "token_type_ids": token_type_ids,
                "attention_mask": torch.ones(b, s, dtype=torch.long), "mlm_labels": labels,
                "next_sentence_label": is_random}
