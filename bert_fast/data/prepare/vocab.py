"""prepare's vocab: a given vocab.txt copied in, or one trained on the inputs with `tokenizers`,
and whether the vocab already in the output folder can stay."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from bert_fast.data.prepare.inputs import file_stats, read_documents
from bert_fast.data.prepare.settings import PrepareSettings
from bert_fast.data.shards import SPECIAL_TOKENS, read_vocab
from bert_fast.fileio import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger("bert_fast.data")
VOCAB_FILE = "vocab.txt"
TRAINED_FILE = "vocab.train.json"  # what a trained vocab.txt was trained from (absent for a given one)
# A pair of pieces seen fewer times than this is never merged into a new word.
MIN_FREQUENCY = 2


def alphabet_limit(vocab_size: int) -> int:
    """How many characters a trained vocab keeps (the most frequent; the others become [UNK]).
    `tokenizers` puts every kept character and a `##` form of each into the vocab before any merge,
    even past vocab_size (its default of 1000 characters gave 1427 words for vocab_size=1000 on
    an input with many distinct characters): keep no more than leave room for both forms."""
    return min(1000, (vocab_size - len(SPECIAL_TOKENS)) // 2)


def vocab_key(files, settings: PrepareSettings) -> str:
    """What a trained vocab depends on: the inputs and the settings `train_vocab` uses."""
    # The limit only where it is not the 1000 every vocab was trained with before it was set, so
    # those vocabs (the cached embedded corpus's among them) are not trained again.
    limit = alphabet_limit(settings.vocab_size)
    text = json.dumps([file_stats(files), settings.vocab_size, settings.lowercase, settings.max_line_chars]
                      + ([limit] if limit != 1000 else []))
    return hashlib.sha256(text.encode()).hexdigest()


def train_vocab(files, output: Path, settings: PrepareSettings) -> Path:
    """A WordPiece vocab trained on the inputs with `tokenizers` (streamed), saved as vocab.txt."""
    from tokenizers import BertWordPieceTokenizer

    def texts():
        for sentences in read_documents(files, settings.max_line_chars):
            yield from sentences

    tokenizer = BertWordPieceTokenizer(lowercase=settings.lowercase)
    limit = alphabet_limit(settings.vocab_size)
    tokenizer.train_from_iterator(texts(), vocab_size=settings.vocab_size, min_frequency=MIN_FREQUENCY,
                                  limit_alphabet=limit, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    words = [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    if sum(len(w) == 1 for w in words) == limit:
        log.info("the vocab keeps the input's %d most frequent characters (vocab_size=%d); any others "
                 "become [UNK]", limit, settings.vocab_size)
    path = output / VOCAB_FILE
    with atomic_path(path) as tmp:
        tmp.write_text("".join(w + "\n" for w in words), encoding="utf-8")
    return path


def short_vocab(asked: int | None, size: int) -> str | None:
    """Why a trained vocab has fewer words than asked (None when it has them all, or was given)."""
    if asked is None or size >= asked:
        return None
    return (f"the vocab trained on the input has {size} words, not the {asked} asked (vocab_size): "
            f"training stops when no pair of adjacent pieces occurs at least {MIN_FREQUENCY} times in "
            "the input, so this input is too small for more words; the model is sized to the vocab")


def vocab_changes(files, output: Path, vocab: str | Path | None,
                  settings: PrepareSettings) -> tuple[bool, str | None]:
    """(whether output/vocab.txt must be put in place again, the key a trained vocab is recorded
    with; None for a given vocab): a given `vocab` other than the one there (checked for its
    special tokens first), or a vocab trained on other inputs or with another vocab_size/lowercase."""
    vocab_file, trained = output / VOCAB_FILE, output / TRAINED_FILE
    if vocab is not None:
        read_vocab(Path(vocab))
        return not vocab_file.is_file() or sha256_file(vocab_file) != sha256_file(Path(vocab)), None
    key = vocab_key(files, settings)
    return not vocab_file.is_file() or (trained.is_file() and trained.read_text() != key), key


def place_vocab(files, output: Path, vocab: str | Path | None, settings: PrepareSettings, new: bool,
                key: str | None) -> None:
    """Puts the vocab in output/vocab.txt when `new` (a copy of `vocab`, else trained and recorded
    with `key`); a given vocab leaves no record of training behind."""
    vocab_file, trained = output / VOCAB_FILE, output / TRAINED_FILE
    if vocab is not None:
        if new:
            with atomic_path(vocab_file) as tmp:
                shutil.copyfile(vocab, tmp)
        trained.unlink(missing_ok=True)
    elif new:
        trained.unlink(missing_ok=True)
        train_vocab(files, output, settings)
        atomic_write_text(trained, key)
