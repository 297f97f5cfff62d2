"""Data pipeline benchmark (not a kernel bench): prepare throughput and sample building.

    python bench/data.py [--quick] [--scale 16] [--out DIR]

- prepare: the embedded docstring corpus repeated `--scale` times, tokenized with its trained
  WordPiece vocab into shards (MB of text/s, per core too, tokens/s), on all cores (a worker
  process per core, the default) and on one core (workers=1, threads=1 and RAYON_NUM_THREADS=1,
  in a subprocess), and the tokenizer alone: our C++ ASCII fast path against the `tokenizers`
  library's encode_batch on the same sentences (identical ids);
- build: one epoch of NSP samples at seq 128 and 512 (plan + fill + masking) on two corpora, the
  docstrings (short documents, so samples average well under the sequence length) and synthetic
  Wikipedia-like long documents (full samples); samples/s for the C++ builder (all threads, one
  thread), the Python reference (on a slice of the corpus; same output), the loader path that
  training uses (C++ fill + collate to torch tensors, one core), and Hugging Face's
  TextDatasetForNextSentencePrediction + DataCollatorForLanguageModeling where transformers still
  ships them (the dataset class left in transformers 5; then only the collator's masking and
  padding is timed, on our pairs, and the row says so).
Rows are written with bench/harness.py's stamp and writer to bench/results/cpu/data.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import BENCH_DIR, stamp, write_results

from bert_fast.data import builder
from bert_fast.data.corpus import default_corpus, default_prepared
from bert_fast.data.dataset import PretrainingDataset, collate
from bert_fast.data.prepare import PrepareSettings, prepare
from bert_fast.data.shards import PreparedCorpus, Shard


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) seconds over `repeats` runs."""
    return summary([_once(fn) for _ in range(repeats)])


def summary(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def row(mode, provider, seconds, status="ok", **extra) -> dict:
    med, p20, p80 = seconds
    return {"mode": mode, "provider": provider, **extra, "status": status, "ms": med * 1e3,
            "ms_p20": p20 * 1e3, "ms_p80": p80 * 1e3}


PREPARE_ONE_CORE = """
import sys, time
from bert_fast.data.prepare import PrepareSettings, prepare
start = time.perf_counter()
prepare([sys.argv[1]], sys.argv[2], vocab=sys.argv[3],
        settings=PrepareSettings(shard_tokens=1 << 20, threads=1, workers=1))
print(time.perf_counter() - start)
"""


def bench_prepare(scale: int, repeats: int) -> list[dict]:
    vocab = default_prepared() / "vocab.txt"
    text = default_corpus().read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.txt"
        src.write_text("\n\n".join([text.strip()] * scale) + "\n")
        mb = src.stat().st_size / 1e6

        def run():
            shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
            return prepare([src], Path(tmp) / "out", vocab=vocab,
                           settings=PrepareSettings(shard_tokens=1 << 20))

        def run_one_core() -> float:
            shutil.rmtree(Path(tmp) / "out1", ignore_errors=True)
            env = dict(os.environ, RAYON_NUM_THREADS="1")
            out = subprocess.run([sys.executable, "-c", PREPARE_ONE_CORE, str(src), str(Path(tmp) / "out1"),
                                  str(vocab)], env=env, capture_output=True, text=True, check=True)
            return float(out.stdout.split()[-1])

        tokens = run()["totals"]["tokens"]
        every, one = [], []
        for _ in range(repeats):  # interleaved, so both see the same load on a shared machine
            every.append(_once(run))
            one.append(run_one_core())
        t, t1 = summary(every), summary(one)
        cores = len(os.sched_getaffinity(0))
        rows.append(row("prepare", f"prepare, {cores} cores ({cores} workers)", t, mb=round(mb, 2),
                        MB_s=mb / t[0], MB_s_core=mb / t[0] / cores, tokens_s=tokens / t[0]))
        rows.append(row("prepare", "prepare, 1 core", t1, mb=round(mb, 2), MB_s=mb / t1[0],
                        MB_s_core=mb / t1[0], tokens_s=tokens / t1[0]))
        small = Path(tmp) / "tokenize.txt"  # at most 4 copies: encode_batch runs at ~3 MB/s
        small.write_text("\n\n".join([text.strip()] * min(scale, 4)) + "\n")
        rows += bench_tokenizer(vocab, small, small.stat().st_size / 1e6, repeats)
    return rows


def bench_tokenizer(vocab: Path, src: Path, mb: float, repeats: int) -> list[dict]:
    from bert_fast.data.prepare.wordpiece import Tokenizer

    sentences = [s for s in src.read_text().splitlines() if s]
    tok = Tokenizer(vocab, lowercase=True)
    rows = []
    for name, fn in ((f"C++ WordPiece (ASCII), {os.cpu_count()} threads", lambda: tok.fast.encode(sentences)),
                     ("C++ WordPiece (ASCII), 1 thread", lambda: tok.fast.encode(sentences, 1)),
                     (f"tokenizers encode_batch, {os.cpu_count()} threads", lambda: tok._slow(sentences))):
        t = timed(fn, repeats)
        rows.append(row("tokenize", name, t, mb=round(mb, 2), MB_s=mb / t[0]))
    return rows


def synthetic_shard(vocab_size: int, docs: int = 4000, seed: int = 0) -> Shard:
    """Wikipedia-like document lengths (10-60 sentences of 5-40 tokens), random token ids, 70% of
    tokens starting a word: every seq-128/512 sample is full, unlike the short docstrings."""
    rng = np.random.default_rng(seed)
    per_doc = rng.integers(10, 61, docs)
    lengths = rng.integers(5, 41, per_doc.sum())
    sentences = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    documents = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
    tokens = rng.integers(5, vocab_size, sentences[-1]).astype(np.uint16)
    return Shard(tokens, (rng.random(len(tokens)) < 0.7).astype(np.uint8), sentences, documents)


def bench_build(corpus_name: str, shards: list[Shard], settings, tokenizer, repeats: int,
                python_docs: int) -> list[dict]:
    seq = settings.max_seq_length
    rows = []

    def build_all(backend, threads, docs=None):
        n, plans = 0, []
        for s in shards:
            documents = np.asarray(s.documents if docs is None else s.documents[:docs + 1])
            sentences = np.asarray(s.sentences[:documents[-1] + 1])
            plan = builder.plan(sentences, documents, settings, 0, backend, threads)
            out = builder.allocate(len(plan), settings)
            keys = np.arange(len(plan), dtype=np.int64)
            builder.fill(np.asarray(s.tokens), np.asarray(s.word_starts), s.doc_starts, plan, keys, keys,
                         settings, 0, out, backend, threads)
            n += len(plan)
            plans.append((plan, out))
        return n, plans

    samples, built = build_all("cpp", 0)
    mean_len = round(float(np.concatenate([o["lengths"] for _, o in built]).mean()), 1)
    common = dict(corpus=corpus_name, seq=seq, mean_len=mean_len)
    for name, threads in ((f"C++ builder, {os.cpu_count()} threads", 0), ("C++ builder, 1 thread", 1)):
        t = timed(lambda threads=threads: build_all("cpp", threads), repeats)
        rows.append(row("build", name, t, **common, samples=samples, samples_s=samples / t[0]))
    py_samples = build_all("cpp", 1, python_docs)[0]
    t = timed(lambda: build_all("python", 0, python_docs), 1)
    rows.append(row("build", "Python reference", t, **common, samples=py_samples,
                    samples_s=py_samples / t[0]))

    # The training path: a batch of 32 random samples filled by one C++ call, then collated.
    torch.set_num_threads(1)
    batches = []
    for shard, (plan, _) in zip(shards, built):
        order = np.random.default_rng(0).permutation(len(plan))
        batches += [(shard, plan, order[i:i + 32]) for i in range(0, len(order), 32)]

    def load():
        for shard, plan, keys in batches:
            out = builder.allocate(len(keys), settings)
            builder.fill(np.asarray(shard.tokens), np.asarray(shard.word_starts), shard.doc_starts,
                         plan[keys], keys, np.arange(len(keys), dtype=np.int64), settings, 0, out, "cpp", 1)
            collate(out)

    t = timed(load, repeats)
    rows.append(row("build", "loader: C++ fill + collate, 1 core", t, **common, samples=samples,
                    samples_s=samples / t[0]))
    rows += bench_hf(tokenizer, [o for _, o in built], settings, common, repeats)
    return rows


def bench_hf(tokenizer, built, settings, common, repeats) -> list[dict]:
    import transformers

    rows = []
    if not hasattr(transformers, "TextDatasetForNextSentencePrediction"):
        rows.append({"mode": "build", "provider": "HF TextDatasetForNextSentencePrediction", **common,
                     "status": f"not available in transformers {transformers.__version__} (removed in v5)"})
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=settings.mask_prob)
    examples = [{"input_ids": out["input_ids"][i, :n].tolist(),
                 "token_type_ids": out["token_type_ids"][i, :n].tolist(),
                 "next_sentence_label": int(out["nsp_label"][i])}
                for out in built for i, n in enumerate(out["lengths"])]
    batches = [examples[i:i + 32] for i in range(0, len(examples), 32)]
    t = timed(lambda: [collator(b) for b in batches], repeats)
    rows.append(row("build", "HF DataCollatorForLanguageModeling (masking + padding only)", t, **common,
                    samples=len(examples), samples_s=len(examples) / t[0]))
    if hasattr(transformers, "TextDatasetForNextSentencePrediction"):  # transformers 4.x
        text = str(default_corpus())
        t = timed(lambda: transformers.TextDatasetForNextSentencePrediction(
            tokenizer, text, block_size=common["seq"], overwrite_cache=True), 1)
        rows.append(row("build", "HF TextDatasetForNextSentencePrediction (docstrings; incl. tokenizing)", t,
                        **common))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, scale 1, seq 128 only")
    parser.add_argument("--scale", type=int, default=16, help="copies of the corpus (~0.76 MB) for prepare")
    parser.add_argument("--python-docs", type=int, default=150, help="documents per shard for the reference")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "cpu")
    args = parser.parse_args(argv)
    if not builder.native_available():
        parser.error("bert_fast._data is not built; run `make install`")
    repeats = 1 if args.quick else 3
    rows = bench_prepare(1 if args.quick else args.scale, repeats)
    import transformers

    corpus = PreparedCorpus(default_prepared())
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(corpus.vocab_path), do_lower_case=True)
    docstrings = [corpus.shard(i) for i in range(corpus.num_shards)]
    synthetic = [synthetic_shard(corpus.vocab_size, docs=500 if args.quick else 4000)]
    for seq in (128,) if args.quick else (128, 512):
        settings = PretrainingDataset.settings_for(corpus, max_seq_length=seq)
        rows += bench_build("docstrings", docstrings, settings, tokenizer, repeats, args.python_docs)
        rows += bench_build("synthetic long docs", synthetic, settings, tokenizer, repeats,
                            args.python_docs // 10)
    for r in rows:
        rate = ", ".join(f"{k}={r[k]:,.{2 if k.startswith('MB_s') else 0}f}"
                         for k in ("MB_s", "MB_s_core", "tokens_s", "samples_s") if r.get(k))
        print(f"{r['mode']:8s} {r.get('corpus', ''):20s} {r['provider']:62s} seq={r.get('seq', '-')!s:4s} "
              f"len={r.get('mean_len', '-')!s:6s} {rate or r['status']}")
    meta = stamp(torch.device("cpu"), torch.float32)
    write_results(args.out, "data", meta, rows, baseline="Python reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
