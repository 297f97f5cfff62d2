"""`python -m bert_fast.train.export`: a ZeRO-3 checkpoint (from the 2-rank launch in test_checkpoint_ranks.py)
exported as a Hugging Face folder loads in transformers with no missing or unexpected keys and
gives our model's outputs; bad paths and invalid checkpoints fail with one line and exit status 2.

End to end: a corpus prepared by `prepare`, a tiny BERT trained on it by `pretrain.py` and exported
at the end of training gives, through `AutoTokenizer` and `BertForPreTraining` alone, the masked
word of a sentence; the exported tokenizer gives the shards' ids and the exported model our
model's logits; files are readable as a plain write makes them and the command lists them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import early
import pytest
import torch
from checkpoint_fixtures import fake_checkpoint as _fake
from test_checkpoint_ranks import MODEL, launch

from bert_fast.data.hf_tokenizer import FILES
from bert_fast.data.prepare import PrepareSettings, prepare
from bert_fast.data.shards import PreparedCorpus
from bert_fast.model import BertForPreTraining
from bert_fast.model.config import BertConfig
from bert_fast.train import checkpoint_load, checkpoint_manifest, export

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture
def zero_run(tmp_path_factory, deepspeed_shm_op):
    return launch(tmp_path_factory)


def _vocab(path: Path, words, size: int | None = None) -> None:
    """A WordPiece vocab: special tokens, punctuation, letters and their `##` forms, then `words`
    (cut or padded with made-up words to `size`)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    entries = SPECIAL + list(".,'") + letters + ["##" + c for c in letters]
    entries += [w for w in dict.fromkeys(words) if w not in entries]
    if size is not None:
        entries = (entries + [f"filler{i}" for i in range(size)])[:size]
    path.write_text("\n".join(entries) + "\n")


def _prepared(folder: Path, vocab_size: int) -> Path:
    """A small corpus prepared with a vocab of exactly `vocab_size` words, for exports of the
    test_checkpoint_ranks run (whose config names no data source)."""
    folder.mkdir(parents=True)
    _vocab(folder / "vocab.txt", ["alpha", "beta", "gamma"], vocab_size)
    (folder / "a.txt").write_text("Alpha beta.\nGamma alpha.\n")
    prepare(folder / "a.txt", folder / "prepared", vocab=folder / "vocab.txt")
    return folder / "prepared"


@pytest.mark.slow
def test_zero3_export_loads_in_transformers_and_matches(zero_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out, _ = zero_run
    hf_dir = tmp_path / "hf"
    data = _prepared(tmp_path / "data", MODEL["vocab_size"])
    # A root: exports what `latest` names. Its run config names no data source: --data does.
    assert export.main([str(out / "z3"), str(hf_dir), "--data", str(data)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {hf_dir} from step 3 of ")
    assert len(transformers.AutoTokenizer.from_pretrained(hf_dir)) == MODEL["vocab_size"]
    hf, info = transformers.BertForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = BertForPreTraining(BertConfig.from_preset("tiny", **MODEL))
    ours.load_state_dict(checkpoint_load.model_state_dict(out / "z3" / "step_00000003"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, MODEL["vocab_size"], (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = (torch.arange(10) >= 5).long().expand(3, 10)
    with torch.no_grad():
        a = ours.eval()(ids, types, mask)
        b = hf.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(a.mlm_logits[keep], b.prediction_logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_dtype_and_replacing_an_earlier_export(zero_run, tmp_path):
    from safetensors.torch import load_file

    out, _ = zero_run
    hf_dir = tmp_path / "hf"
    data = _prepared(tmp_path / "data", MODEL["vocab_size"])
    export.export_checkpoint(out / "z3" / "step_00000002", hf_dir, data=data)
    export.export_checkpoint(out / "z3", hf_dir, dtype="bfloat16", data=data)  # replaces the earlier export
    weights = load_file(hf_dir / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert '"step": 3' in (hf_dir / "bert_fast_export.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf"]  # no temporary folders left behind


@pytest.mark.parametrize("command", [["-m", "bert_fast.train.export"], ["-m", "bert_fast.cli", "export"]],
                         ids=["module", "bert-fast export"])
def test_cli_missing_path_fails_cleanly(tmp_path, command):
    proc = subprocess.run([sys.executable, *command, str(tmp_path / "nope"), str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "nope does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_invalid_checkpoint_fails_cleanly(tmp_path, capsys):
    path = _fake(tmp_path / "ckpts", 4)
    (path / "rng_rank00000.pt").write_bytes(b"")
    assert export.main([str(path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "step_00000004" in err and "rng_rank00000.pt" in err
    assert not (tmp_path / "hf").exists()
    (path / checkpoint_manifest.MANIFEST).unlink()
    assert export.main([str(tmp_path / "ckpts"), str(tmp_path / "hf")]) == 2  # root -> latest -> partial
    assert "partial" in capsys.readouterr().err


def test_export_refuses_to_replace_other_folders(tmp_path):
    path = _fake(tmp_path / "ckpts", 4)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(checkpoint_manifest.CheckpointError, match="not an earlier export"):
        export.export_checkpoint(path, other)
    assert (other / "keep.txt").read_text() == "mine"


# ---- end to end: prepare -> pretrain.py -> export at the end of training -> transformers ----

# Sentences a tiny BERT learns by heart in a few hundred steps, so a masked word is obvious; each
# comes as written, upper-cased and lower-cased, and two are not ASCII (the `tokenizers` path).
PROVERBS = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine.",
            "Early birds catch the worm.", "Still waters run deep.", "Fortune favours the bold.",
            "Le café est très chaud.", "Über den Wolken ist es kalt."]
STEPS = 300


def _plain(text: str) -> str:
    """Lower-cased without accents, as an uncased BERT vocab holds words."""
    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


@early.job
def trained(root, threads):
    """(root, prepared folder, export folder): the proverbs prepared with an uncased vocab of their
    words, and a tiny BERT trained on them by `pretrain.py` with export.hf_dir set; started with
    the session on one thread (tests/early.py: one and two threads give the same predictions, with
    the same probabilities to 3 digits)."""
    import random

    rng = random.Random(0)
    documents = [[rng.choice([s, s.upper(), s.lower()]) for s in rng.choices(PROVERBS, k=rng.randint(2, 5))]
                 for _ in range(400)]
    (root / "corpus.txt").write_text("\n\n".join("\n".join(d) for d in documents) + "\n", encoding="utf-8")
    _vocab(root / "vocab.txt", [w.strip(".") for s in PROVERBS for w in _plain(s).split()])
    prepare(root / "corpus.txt", root / "data", vocab=root / "vocab.txt",
            settings=PrepareSettings(shard_tokens=4000, workers=1))
    done = early.run(
        [sys.executable, "pretrain.py", "--config", "configs/tiny-cpu.yaml", f"train.output_dir={root / 'run'}",
         f"data.source={root / 'data'}", "data.seq_length=32", "data.workers=0", f"train.steps={STEPS}",
         "train.micro_batch=32", "eval.every=0", "log.every=100", "checkpoint.every=0", "optimizer.name=adamw",
         "optimizer.lr=3e-3", "schedule.warmup_steps=30", "schedule.decay=linear", f"train.threads={threads}",
         f"export.hf_dir={root / 'hf'}"], cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, root / "data", root / "hf"


@pytest.mark.slow
def test_export_fills_a_masked_word_through_transformers_alone(trained):
    transformers = pytest.importorskip("transformers")
    _, _, hf_dir = trained
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.BertForPreTraining.from_pretrained(hf_dir).eval()
    cases = {"The quick brown [MASK] jumps over the lazy dog.": "fox",
             "THE QUICK BROWN FOX JUMPS OVER THE LAZY [MASK].": "dog",  # lower-cased as the vocab was built
             "A stitch in [MASK] saves nine.": "time",
             "LE CAFÉ EST TRÈS [MASK].": "chaud"}  # accents stripped as the vocab was built
    for text, word in cases.items():
        batch = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).prediction_logits[0]
        where = batch["input_ids"][0].tolist().index(tokenizer.mask_token_id)
        best = tokenizer.convert_ids_to_tokens(logits[where].topk(3).indices.tolist())
        assert best[0] == word, (text, best)


@pytest.mark.slow
def test_exported_tokenizer_and_model_agree_with_prepare_and_ours(trained):
    """Every sentence of the corpus: the exported tokenizer's ids are the shards' ids (the C++
    fast path wrote the ASCII ones, `tokenizers` the others). Pairs of sentences: the same
    input ids and segment ids as our [CLS] A [SEP] B [SEP], and the exported model's logits on
    them are our checkpoint's, loaded into our model."""
    transformers = pytest.importorskip("transformers")
    root, data, hf_dir = trained
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    corpus = PreparedCorpus(data)
    assert len(tokenizer) == corpus.vocab_size and tokenizer.do_lower_case
    sentences = [line for line in (root / "corpus.txt").read_text(encoding="utf-8").splitlines() if line]
    assert any(s.isascii() for s in sentences) and any(not s.isascii() for s in sentences)
    shard_ids = []
    for i in range(corpus.num_shards):
        shard = corpus.shard(i)
        shard_ids += [shard.tokens[a:b].tolist() for a, b in zip(shard.sentences[:-1], shard.sentences[1:])]
    assert [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences] == shard_ids

    checkpoint = checkpoint_manifest.resolve_resume(root / "run" / "checkpoints", "auto")
    ours = BertForPreTraining(export.checkpoint_model_config(checkpoint_manifest.read_metadata(checkpoint), checkpoint))
    ours.load_state_dict(checkpoint_load.model_state_dict(checkpoint))
    hf = transformers.BertForPreTraining.from_pretrained(hf_dir).eval()
    special = corpus.special
    pairs = [(0, 1), (5, 9), (17, 2)]
    batch = tokenizer([sentences[a] for a, _ in pairs], [sentences[b] for _, b in pairs], padding=True,
                      return_tensors="pt")
    ids = torch.full_like(batch["input_ids"], special["pad_id"])
    types = torch.zeros_like(ids)
    for row, (a, b) in enumerate(pairs):
        tokens = [special["cls_id"], *shard_ids[a], special["sep_id"], *shard_ids[b], special["sep_id"]]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        types[row, len(shard_ids[a]) + 2:len(tokens)] = 1
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["token_type_ids"], types)
    mask = batch["attention_mask"]
    with torch.no_grad():
        theirs = hf(**batch)
        mine = ours.eval()(ids, types, mask)
    real = mask.bool()
    torch.testing.assert_close(theirs.prediction_logits[real], mine.mlm_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.seq_relationship_logits, mine.nsp_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_command_prints_what_it_wrote_with_the_modes_of_plain_writes(trained, tmp_path, capsys):
    """The end-of-training export and `python -m bert_fast.train.export` write the same complete folder;
    its files and folder have the modes a plain write and mkdir give here (save_pretrained's 0644
    and 0755 under the usual umask), and the command lists every file and the tokenizer."""
    root, data, trained_export = trained
    hf_dir = tmp_path / "hf"
    assert export.main([str(root / "run" / "checkpoints"), str(hf_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    (tmp_path / "plain.txt").write_text("")
    (tmp_path / "plain").mkdir()
    file_mode, dir_mode = ((tmp_path / n).stat().st_mode & 0o777 for n in ("plain.txt", "plain"))
    names = sorted([*FILES, "config.json", "model.safetensors", export.INFO])
    for folder in (hf_dir, trained_export):
        assert sorted(p.name for p in folder.iterdir()) == names
        assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(names, file_mode)
        assert folder.stat().st_mode & 0o777 == dir_mode
        assert (folder / "vocab.txt").read_bytes() == (data / "vocab.txt").read_bytes()
    assert printed[0] == f"wrote {hf_dir} from step {STEPS} of {(root / 'run' / 'checkpoints').resolve()}/" \
                         f"step_{STEPS:08d} (torch.float32):"
    assert [line.split()[0] for line in printed[1:-1]] == names
    assert all(int(line.split()[1].replace(",", "")) == (hf_dir / line.split()[0]).stat().st_size
               for line in printed[1:-1])
    words = PreparedCorpus(data).vocab_size
    assert printed[-1] == (f"tokenizer: {words} words (lower-cased, accents stripped) from "
                           f"{(data / 'vocab.txt').resolve()}")
    info = json.loads((hf_dir / export.INFO).read_text())
    assert info["tokenizer"]["sha256"] == PreparedCorpus(data).manifest["vocab"]["sha256"]


# ---- where the run's vocab is, without training ----------------------------------------------

def _fake_run(tmp_path, data: dict | None, vocab_size: int = 101) -> Path:
    """A checkpoint (weights not loadable) whose client_state holds a run config with `data`."""
    path = _fake(tmp_path / "ckpts", 4)
    manifest = path / checkpoint_manifest.MANIFEST
    config = {"model": {"preset": "tiny"}, **({"data": data} if data is not None else {})}
    model = BertConfig.from_preset("tiny", vocab_size=vocab_size).to_dict()
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "client_state": {"config": config, "model_config": model}}))
    return path


def test_missing_or_unknown_data_folder_is_named(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    path = _fake_run(tmp_path, {"source": str(nowhere), "vocab_size": 8192})
    assert export.main([str(path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the run's vocab (data.source=") and str(nowhere) in err and "--data" in err
    assert not (tmp_path / "hf").exists()
    path = _fake_run(tmp_path / "ckpts2", None)
    assert export.main([str(path), str(tmp_path / "hf")]) == 2
    assert "records no data.source" in capsys.readouterr().err


def test_a_vocab_of_another_size_is_refused(tmp_path, capsys):
    path = _fake_run(tmp_path, {"source": "synthetic", "vocab_size": 8192}, vocab_size=101)
    data = _prepared(tmp_path / "data", 120)
    assert export.main([str(path), str(tmp_path / "hf"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "vocab.txt has 120 words and [PAD] id 0, the model 101 and 0: it is not the vocab this run" in err


def test_run_vocab_is_found_from_the_run_config(tmp_path, monkeypatch):
    """data.source: a prepared folder is read as it is; "corpus" is the embedded corpus prepared
    with data.vocab_size in the cache; "synthetic" has no vocab."""
    from bert_fast.data.corpus import prepared_folder

    data = _prepared(tmp_path / "data", 101)
    meta = lambda source: {"client_state": {"config": {"data": {"source": source, "vocab_size": 101}}}}  # noqa: E731
    assert export.run_corpus(meta(str(data)), tmp_path).folder == data
    assert export.run_corpus(meta("synthetic"), tmp_path) is None
    monkeypatch.setenv("BERT_FAST_CACHE", str(tmp_path / "cache"))
    cached = prepared_folder(101)
    assert cached.is_relative_to(tmp_path / "cache")
    cached.parent.mkdir(parents=True)
    os.rename(data, cached)
    assert export.run_corpus(meta("corpus"), tmp_path).folder == cached
