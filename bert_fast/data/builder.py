"""The sample builder's Python face: validates arguments, allocates the output arrays and runs
the C++ builder (`bert_fast._data`, csrc/data/builder.cpp) or the Python reference
(bert_fast/data/reference.py), which produce identical samples.

`plan` cuts one shard into samples for an epoch (token ranges, 5 int64 per sample); `fill` turns
any subset of plan rows into padded arrays, so a loader plans an epoch once and fills batches on
demand. Samples are keyed by a global sample index, so their masks do not depend on batching.
"""

from __future__ import annotations

import numpy as np

from bert_fast.data import reference
from bert_fast.data.settings import SampleSettings
from bert_fast.labels import IGNORE_INDEX

try:
    from bert_fast import _data
except ImportError as err:  # the extension is built by `make install`
    _data, _IMPORT_ERROR = None, err
else:
    _IMPORT_ERROR = None

BACKENDS = ("cpp", "python")
OUTPUTS = ("input_ids", "token_type_ids", "lengths", "mlm_positions", "mlm_labels", "nsp_label")


def native_available() -> bool:
    return _data is not None


def _native_settings(s: SampleSettings):
    n = _data.Settings()
    for name in ("max_seq_length", "mask_prob", "short_seq_prob", "whole_word_mask", "seed", "vocab_size",
                 "pad_id", "cls_id", "sep_id", "mask_id"):
        setattr(n, name, getattr(s, name))
    n.objective, n.predictions = s.objective_code, s.predictions
    return n


def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp" and _data is None:
        raise RuntimeError(f"the C++ sample builder bert_fast._data is not built ({_IMPORT_ERROR}); "
                           "run `make install`, or pass backend='python'")
    return backend


def _int64(name: str, value, ndim: int) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {value.shape}")
    if value.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got {value.dtype}")
    return np.ascontiguousarray(value, dtype=np.int64)


def check_offsets(sentences: np.ndarray, documents: np.ndarray, n_tokens: int | None = None):
    """Sentence offsets (into tokens) and document offsets (into sentences): start at 0, rise
    strictly (no empty sentence or document), end at the token and sentence counts."""
    sentences, documents = _int64("sentences", sentences, 1), _int64("documents", documents, 1)
    for name, off, end in (("sentences", sentences, n_tokens), ("documents", documents, len(sentences) - 1)):
        if len(off) < 2 or off[0] != 0 or (np.diff(off) <= 0).any():
            raise ValueError(f"{name} offsets must start at 0 and rise strictly (no empty entries)")
        if end is not None and off[-1] != end:
            raise ValueError(f"{name} offsets end at {off[-1]}, expected {end}")
    return sentences, documents


def plan(sentences: np.ndarray, documents: np.ndarray, settings: SampleSettings, epoch: int,
         backend: str = "cpp", threads: int = 0) -> np.ndarray:
    """Samples of one shard for `epoch`: int64 [n, 5] rows (a_begin, a_end, b_begin, b_end, label)."""
    if not isinstance(settings, SampleSettings):
        raise TypeError(f"settings must be a SampleSettings, got {type(settings).__name__}")
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    sentences, documents = check_offsets(sentences, documents)
    if _backend(backend) == "python":
        return reference.plan(sentences, documents, settings, epoch)
    return _data.plan(sentences, documents, _native_settings(settings), epoch, threads)


def plan_lengths(plan_rows: np.ndarray, settings: SampleSettings, doc_starts: np.ndarray) -> np.ndarray:
    """The token count `fill` gives each planned sample (int64 [n]), without building it: [CLS] A
    [SEP] B [SEP] for a pair; for `none`, [CLS] and [SEP] plus a [SEP] at each document start
    inside the span (doc_starts: int64 token offsets where documents begin)."""
    rows = np.asarray(plan_rows, dtype=np.int64).reshape(-1, 5)
    length = rows[:, 1] - rows[:, 0] + 2
    if settings.objective == "none":
        starts = np.asarray(doc_starts, dtype=np.int64)
        inside = (np.searchsorted(starts, rows[:, 1], side="left")
                  - np.searchsorted(starts, rows[:, 0], side="right"))
        return length + np.maximum(inside, 0)
    return length + rows[:, 3] - rows[:, 2] + 1


def allocate(batch: int, settings: SampleSettings) -> dict[str, np.ndarray]:
    """Output arrays for `batch` samples (what `fill` writes)."""
    s, p = settings.max_seq_length, settings.predictions
    return {"input_ids": np.zeros((batch, s), np.int32), "token_type_ids": np.zeros((batch, s), np.int8),
            "lengths": np.zeros(batch, np.int32), "mlm_positions": np.zeros((batch, p), np.int32),
            "mlm_labels": np.full((batch, p), IGNORE_INDEX, np.int32),
            "nsp_label": np.zeros(batch, np.int32)}


def fill(tokens: np.ndarray, word_starts: np.ndarray, doc_starts: np.ndarray, plan_rows: np.ndarray,
         keys: np.ndarray, rows: np.ndarray, settings: SampleSettings, epoch: int, out: dict,
         backend: str = "cpp", threads: int = 0) -> dict:
    """Builds sample `keys[i]` from `plan_rows[i]` into row `rows[i]` of `out` (see `allocate`).

    tokens: uint16 or int32 [T]; word_starts: uint8 [T] (1 where a word begins); doc_starts:
    int64 token offsets where documents begin (for `none`'s [SEP]s)."""
    if not isinstance(settings, SampleSettings):
        raise TypeError(f"settings must be a SampleSettings, got {type(settings).__name__}")
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if not isinstance(tokens, np.ndarray) or tokens.dtype not in (np.uint16, np.int32) or tokens.ndim != 1:
        raise TypeError("tokens must be a 1-D uint16 or int32 numpy array")
    if not isinstance(word_starts, np.ndarray) or word_starts.shape != tokens.shape:
        raise ValueError(f"word_starts must be a numpy array shaped like tokens {tokens.shape}")
    doc_starts = _int64("doc_starts", doc_starts, 1)
    plan_rows, keys, rows = _int64("plan", plan_rows, 2), _int64("keys", keys, 1), _int64("rows", rows, 1)
    for name in OUTPUTS:
        if name not in out:
            raise ValueError(f"out is missing {name!r}; make it with allocate()")
    if _backend(backend) == "python":
        reference.fill(tokens, word_starts, doc_starts, plan_rows, keys, rows, settings, epoch, out)
        return out
    _data.fill(np.ascontiguousarray(tokens), np.ascontiguousarray(word_starts, dtype=np.uint8), doc_starts,
               plan_rows, keys, rows, _native_settings(settings), epoch, *(out[k] for k in OUTPUTS),
               threads=threads)
    return out


def build(tokens, word_starts, sentences, documents, settings: SampleSettings, epoch: int,
          backend: str = "cpp", first_key: int = 0) -> dict[str, np.ndarray]:
    """Plan and fill every sample of one shard (keys first_key, first_key + 1, ...)."""
    rows = plan(sentences, documents, settings, epoch, backend)
    out = allocate(len(rows), settings)
    index = np.arange(len(rows), dtype=np.int64)
    doc_starts = np.asarray(sentences, np.int64)[np.asarray(documents, np.int64)[:-1]]
    fill(tokens, word_starts, doc_starts, rows, index + first_key, index, settings, epoch, out, backend)
    out["plan"] = rows
    return out
