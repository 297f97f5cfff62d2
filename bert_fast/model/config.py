"""Model configuration: Hugging Face `BertConfig` field names, plus the backend switches.

Field names match `transformers.BertConfig` so a config.json round-trips without renaming
(see `bert_fast/model/hf.py`). Presets follow the BERT paper and Google's miniature BERTs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bert_fast.backends import ATTENTION_IMPLS, BACKENDS

# "gelu" is the exact erf form BERT trained with; the tanh forms are HF's approximations.
HIDDEN_ACTS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    backend: str = "auto"
    attention_impl: str = "auto"

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BertConfig.{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"BertConfig.{name} must be >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{name} must be a float in [0, 1), got {value!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"BertConfig.{name} must be a positive float, got {value!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"BertConfig.hidden_act must be one of {sorted(HIDDEN_ACTS)}, "
                             f"got {self.hidden_act!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"BertConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"BertConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig.pad_token_id ({self.pad_token_id}) must be in "
                             f"[0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        """The `approximate` argument of `torch.nn.functional.gelu` for `hidden_act`."""
        return HIDDEN_ACTS[self.hidden_act]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BertConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> BertConfig:
        """Build from a dict, rejecting unknown keys by name (typos must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BertConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _preset(layers: int, hidden: int, heads: int) -> dict:
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                intermediate_size=4 * hidden)


# L/H/A as in the BERT paper (base, large) and Google's miniature BERTs (tiny, mini, small).
PRESETS = {
    "tiny": _preset(2, 128, 2),
    "mini": _preset(4, 256, 4),
    "small": _preset(4, 512, 8),
    "base": _preset(12, 768, 12),
    "large": _preset(24, 1024, 16),
}
