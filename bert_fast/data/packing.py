"""Static packed batches: what the training loader hands the model, built and checked on the host.

A micro batch of B samples becomes its real tokens back to back, padded with filler rows up to
one of a few fixed row counts (token buckets), with `cu_seqlens` [B + 1], `max_seqlen` = the
sequence length, and B x P MLM slots (P = `SampleSettings.predictions`, BERT's
max_predictions_per_seq; unused slots are labelled -100). Everything the device would otherwise
read back (T, max_seqlen, the MLM positions, the id ranges) is known here, so a training step
needs no host sync, and a run sees at most `count` batch shapes, so it compiles once per shape
and can be captured in CUDA graphs.

Why buckets and not a fixed token budget (NVIDIA's MLPerf BERT packs samples into fixed rows):
a budget keeps one shape but lets the number of sequences per step vary with their lengths,
which changes the global batch the learning rate and LAMB were tuned for, and the sampler's
position per step; buckets keep B sequences per micro batch exactly as configured.
bench/packing.py measures both on the pipeline's length distribution (bench/results/cpu/packing.md).

The buckets are chosen once per run from this rank's first epoch (lengths known from the plans
without building a sample; `likely_totals`): the row counts that minimise the filler over its
batches and as many drawn at random, with B x max_seq_length, which any batch fits, the last.
"""

from __future__ import annotations

import numpy as np
import torch

from bert_fast.data.settings import SampleSettings
from bert_fast.labels import IGNORE_INDEX

ALIGN = 8  # row counts are multiples of 8: aligned GEMM tiles and 16-byte rows
GRID = 1024  # candidate row counts considered by the choice (a step of max_total / GRID)


def batch_totals(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> np.ndarray:
    """Tokens of each micro batch when samples come in `order` (the rank's sampler order), the
    last one possibly partial."""
    per_sample = np.asarray(lengths, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
    starts = np.arange(0, len(per_sample), batch_size)
    return np.add.reduceat(per_sample, starts) if len(per_sample) else np.zeros(0, np.int64)


def likely_totals(lengths: np.ndarray, order: np.ndarray, batch_size: int, draws: int = 4096,
                  seed: int = 0, more: np.ndarray | None = None) -> np.ndarray:
    """Per-batch token counts to choose buckets from: this epoch's batches in `order`, plus
    `draws` batches of samples drawn at random from this epoch's lengths and `more` (the next
    epoch's, whose plans differ). A small corpus has few batches, and the next epoch's mean
    length moves by a percent or two: the draws fit the buckets to the distribution of batch
    totals rather than to one epoch's handful of values."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pool = lengths if more is None else np.concatenate([lengths, np.asarray(more, dtype=np.int64)])
    drawn = np.random.default_rng(seed).choice(pool, (draws, batch_size)).sum(1) if len(pool) else []
    return np.concatenate([batch_totals(lengths, order, batch_size), drawn]).astype(np.int64)


def choose_buckets(totals: np.ndarray, max_total: int, count: int = 8) -> tuple[int, ...]:
    """At most `count` row counts, ascending, the last `max_total` (rounded up to ALIGN), that
    minimise the filler rows summed over `totals`: an exact dynamic programme over candidates on a
    grid of max_total / GRID rows (each total rounded up to it), so choosing takes milliseconds."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")
    top = _align(max_total)
    step = _align(max(ALIGN, -(-top // GRID)))
    totals = np.asarray(totals, dtype=np.int64)
    if count == 1 or totals.size == 0:
        return (top,)
    # Candidate tops: each total rounded up to the grid, and `top`, which must be one.
    rounded = np.minimum(-(-totals // step) * step, top)
    values, weights = np.unique(np.append(rounded, top), return_counts=True)
    weights[-1] -= 1  # the appended top is no batch
    if len(values) <= count:
        return tuple(int(v) for v in values)
    return tuple(sorted(_optimal_tops(values, weights, totals, rounded, count)))


def _optimal_tops(values, weights, totals, rounded, k: int) -> list[int]:
    """At most k tops among `values` (the largest included) minimising sum(top(total) - total):
    f[j][b], the least filler for values 0..b with j tops the last at values[b], is
    min over a of f[j - 1][a - 1] + cost[a, b]."""
    n = len(values)
    sums = np.bincount(np.searchsorted(values, rounded), weights=totals, minlength=n)
    cw, cs = np.concatenate([[0], np.cumsum(weights)]), np.concatenate([[0.0], np.cumsum(sums)])
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    # cost[a, b]: the batches of values a..b all padded to values[b]
    cost = np.where(a <= b, values[b] * (cw[b + 1] - cw[a]) - (cs[b + 1] - cs[a]), np.inf)
    f, fs, args = cost[0], [cost[0]], []
    for _ in range(1, k):
        options = np.concatenate([[np.inf], f[:-1]])[:, None] + cost
        arg = options.argmin(0)
        f = options[arg, np.arange(n)]
        fs.append(f)
        args.append(arg)
    j = int(np.argmin([g[n - 1] for g in fs]))  # fewer tops when more would not help
    tops, b = [], n - 1
    for arg in reversed(args[:j]):
        tops.append(int(values[b]))
        b = int(arg[b]) - 1
    tops.append(int(values[b]))
    return tops


def _align(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


class StaticCollate:
    """Builder output of up to `batch_size` samples -> the packed static batch (module docstring):
    input_ids, token_type_ids [T] int64 (filler: the pad id, type 0), cu_seqlens [B + 1] int32,
    max_seqlen (int), mlm_positions, mlm_labels [B * P] int64, next_sentence_label [B] int64 (-100
    for empty slots of a last, partial batch), tokens and sequences (ints: the real ones).
    Checked here, on the host: ids, types and labels in range, MLM positions on the real tokens.
    Picklable, for DataLoader workers."""

    def __init__(self, batch_size: int, settings: SampleSettings, buckets: tuple[int, ...]):
        self.batch_size, self.settings = batch_size, settings
        self.buckets = np.asarray(sorted(buckets), dtype=np.int64)
        if self.buckets[-1] < batch_size * settings.max_seq_length:
            raise ValueError(f"the largest bucket ({self.buckets[-1]}) must hold a full batch "
                             f"({batch_size} x {settings.max_seq_length})")

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict:
        s, slots = self.settings, self.batch_size
        lengths = arrays["lengths"].astype(np.int64)
        n = len(lengths)
        if not 1 <= n <= slots:
            raise ValueError(f"a batch of {n} samples for {slots} slots")
        real = int(lengths.sum())
        total = int(self.buckets[np.searchsorted(self.buckets, real)])
        keep = np.arange(s.max_seq_length)[None, :] < lengths[:, None]
        input_ids = np.full(total, s.pad_id, dtype=np.int64)
        input_ids[:real] = arrays["input_ids"][keep]
        token_types = np.zeros(total, dtype=np.int64)
        token_types[:real] = arrays["token_type_ids"][keep]
        cu = np.zeros(slots + 1, dtype=np.int32)
        cu[1:n + 1] = np.cumsum(lengths)
        cu[n + 1:] = real
        p = s.predictions
        positions = np.zeros((slots, p), dtype=np.int64)
        labels = np.full((slots, p), IGNORE_INDEX, dtype=np.int64)
        positions[:n] = arrays["mlm_positions"] + cu[:n, None]
        labels[:n] = arrays["mlm_labels"]
        positions[labels == IGNORE_INDEX] = 0
        nsp = np.full(slots, IGNORE_INDEX, dtype=np.int64)
        nsp[:n] = arrays["nsp_label"]
        self._check(input_ids[:real], token_types[:real], positions, labels, lengths, cu, nsp)
        return {"input_ids": torch.from_numpy(input_ids), "token_type_ids": torch.from_numpy(token_types),
                "cu_seqlens": torch.from_numpy(cu), "max_seqlen": s.max_seq_length,
                "mlm_positions": torch.from_numpy(positions.reshape(-1)),
                "mlm_labels": torch.from_numpy(labels.reshape(-1)),
                "next_sentence_label": torch.from_numpy(nsp), "tokens": real, "sequences": n}

    def _check(self, ids, types, positions, labels, lengths, cu, nsp) -> None:
        s = self.settings
        predicted = labels != IGNORE_INDEX
        problems = [
            ("input_ids", ids.size and (ids.min() < 0 or ids.max() >= s.vocab_size)),
            ("token_type_ids", types.size and (types.min() < 0 or types.max() > 1)),
            ("sequence lengths", lengths.min() < 1 or lengths.max() > s.max_seq_length),
            ("mlm_labels", predicted.any() and (labels[predicted].min() < 0
                                                or labels[predicted].max() >= s.vocab_size)),
            ("mlm_positions", predicted.any() and positions[predicted].max() >= cu[-1]),
            ("next_sentence_label", ((nsp != IGNORE_INDEX) & ((nsp < 0) | (nsp > 1))).any()),
        ]
        bad = [name for name, wrong in problems if wrong]
        if bad:
            raise ValueError(f"the sample builder produced out-of-range {', '.join(bad)} "
                             f"(vocab_size={s.vocab_size}, max_seq_length={s.max_seq_length})")


def pack_full_length(batch: dict, predictions: int) -> dict:
    """A padded batch whose every row is real (attention_mask all 1, e.g. SyntheticBatches) in the
    packed static form of StaticCollate: one shape, B x `predictions` MLM slots. Refuses a row
    with padding or with more than `predictions` masked tokens."""
    ids, labels = batch["input_ids"], batch["mlm_labels"]
    b, s = ids.shape
    if not bool(batch["attention_mask"].bool().all()):
        raise ValueError("pack_full_length takes batches without padding (attention_mask all 1)")
    predicted = labels != IGNORE_INDEX
    most = int(predicted.sum(1).max()) if b else 0
    if most > predictions:
        raise ValueError(f"a row has {most} masked tokens, more than its {predictions} MLM slots")
    # Each row's predicted positions first, in order (a stable sort of "not predicted").
    order = torch.sort((~predicted).to(torch.int8), dim=1, stable=True).indices[:, :predictions]
    taken = torch.gather(predicted, 1, order)
    positions = torch.where(taken, order + torch.arange(b)[:, None] * s, 0)
    return {"input_ids": ids.reshape(-1), "token_type_ids": batch["token_type_ids"].reshape(-1),
            "cu_seqlens": torch.arange(0, (b + 1) * s, s, dtype=torch.int32), "max_seqlen": s,
            "mlm_positions": positions.reshape(-1),
            "mlm_labels": torch.where(taken, torch.gather(labels, 1, order), IGNORE_INDEX).reshape(-1),
            "next_sentence_label": batch["next_sentence_label"], "tokens": b * s, "sequences": b}
