"""PrepareSettings: how `prepare` cuts, filters and tokenizes its inputs, checked when made."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bert_fast.data.shards import SPECIAL_TOKENS


@dataclass(frozen=True)
class PrepareSettings:
    shard_tokens: int = 1 << 24
    max_line_chars: int = 100_000
    min_sentences: int = 2
    lowercase: bool = True
    vocab_size: int = 30522          # when a vocab is trained
    max_non_utf8_share: float = 0.1  # a file with a larger share of lines that are not UTF-8 is refused
    batch_chars: int = 1 << 20       # bytes of input per chunk (a worker's unit of work)
    threads: int = 0                 # tokenizer threads per worker (0: all cores with 1 worker, else 1)
    workers: int = 0                 # processes (0: all cores); neither changes the output

    def __post_init__(self):
        for name in ("threads", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("shard_tokens", "max_line_chars", "min_sentences", "vocab_size", "batch_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        share = self.max_non_utf8_share
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 <= share <= 1.0:
            raise ValueError(f"max_non_utf8_share must be a number in [0, 1], got {share!r}")
        if self.vocab_size < len(SPECIAL_TOKENS) + 100:
            raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 100}, got {self.vocab_size}")


def output_settings(settings: PrepareSettings) -> dict:
    """The settings that decide the output (threads, workers and chunk size do not, nor the text
    check, which only refuses inputs)."""
    skip = ("threads", "workers", "batch_chars", "max_non_utf8_share")
    return {k: v for k, v in asdict(settings).items() if k not in skip}
