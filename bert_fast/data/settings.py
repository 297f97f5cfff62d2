"""Sample-building settings shared by the C++ builder and the Python reference."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

OBJECTIVES = ("nsp", "sop", "none")


@dataclass(frozen=True)
class SampleSettings:
    """How samples are cut from documents and masked (create_pretraining_data.py's flags).

    objective: `nsp` (BERT: B is the true next segment or, half the time, a segment of another
    document), `sop` (ALBERT: A and B are consecutive segments of one document, swapped half the
    time) or `none` (RoBERTa/MosaicBERT: documents packed into full-length single sequences with
    [SEP] between documents; MLM only, next_sentence_label is -100).
    """

    max_seq_length: int = 128
    objective: str = "nsp"
    mask_prob: float = 0.15
    max_predictions: int = 0          # 0: ceil(mask_prob * max_seq_length), as BERT's 20 at 128
    short_seq_prob: float = 0.1
    whole_word_mask: bool = False
    seed: int = 0
    vocab_size: int = 30522
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 5:
            raise ValueError(f"max_seq_length must be an int >= 5, got {self.max_seq_length!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob!r}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob must be in [0, 1], got {self.short_seq_prob!r}")
        if not isinstance(self.max_predictions, int) or self.max_predictions < 0:
            raise ValueError(f"max_predictions must be an int >= 0, got {self.max_predictions!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        for name in ("pad_id", "cls_id", "sep_id", "mask_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}")

    @property
    def predictions(self) -> int:
        """Masked positions per sequence at most (the width of mlm_positions)."""
        return self.max_predictions or math.ceil(self.mask_prob * self.max_seq_length)

    @property
    def objective_code(self) -> int:
        return OBJECTIVES.index(self.objective)

    def to_dict(self) -> dict:
        return asdict(self)
