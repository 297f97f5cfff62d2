"""A prepared corpus's vocab as a Hugging Face tokenizer folder: the files
`transformers.AutoTokenizer.from_pretrained` reads, giving the ids `prepare` wrote.

`wordpiece` is the one tokenizer prepare uses (its C++ fast path gives the same ids on ASCII), so
tokenizer.json, its serialisation, normalises as the shards were made: lower-casing and accent
stripping as the vocab was built, BERT's punctuation and CJK splitting, [CLS] A [SEP] B [SEP] around
sentences. vocab.txt serves transformers' pure-Python BertTokenizer; tokenizer_config.json and
special_tokens_map.json carry the same settings in the form transformers 4 and 5 read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bert_fast.data.shards import read_vocab

FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
           "mask_token": "[MASK]"}


def wordpiece(vocab: str | Path, lowercase: bool):
    """BERT's WordPiece over `vocab` (`tokenizers`); lowercase also strips accents, as in BERT."""
    from tokenizers import BertWordPieceTokenizer

    return BertWordPieceTokenizer(str(vocab), lowercase=lowercase)


def write_hf_tokenizer(vocab: str | Path, lowercase: bool, folder: str | Path,
                       model_max_length: int) -> list[Path]:
    """Writes FILES into `folder` (which must exist); returns their paths."""
    vocab, folder = Path(vocab), Path(folder)
    read_vocab(vocab)  # a vocab without the special tokens is named here, not by transformers
    shutil.copyfile(vocab, folder / "vocab.txt")
    wordpiece(vocab, lowercase).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "strip_accents": None,
              "tokenize_chinese_chars": True, "model_max_length": model_max_length, **SPECIAL}
    for name, values in (("tokenizer_config.json", config), ("special_tokens_map.json", SPECIAL)):
        (folder / name).write_text(json.dumps(values, indent=2) + "\n")
    return [folder / name for name in FILES]
