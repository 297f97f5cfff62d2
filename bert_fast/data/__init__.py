"""Pretraining data: raw text -> shards -> NSP/SOP/packed samples + MLM masks -> batches.

prepare/     text/JSONL -> WordPiece shards + manifest.json (`bert-fast data prepare`)
textcheck.py whether an input file is text (prepare refuses those that are not)
hf_tokenizer.py  a prepared vocab as a Hugging Face tokenizer folder (for the export)
shards.py    the shard format; PreparedCorpus reads it back with checks
settings.py  SampleSettings (objective, masking rate, ...)
builder.py   the C++ sample builder (csrc/data/) behind validation; reference.py is its Python twin
rng.py       the splitmix64 streams both share
dataset.py   dataset, resumable distributed sampler, collate (padded and packed), loader
corpus.py    the embedded default corpus (installed docstrings)
synthetic.py synthetic topic batches for smoke runs
"""
