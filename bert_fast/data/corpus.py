"""The embedded default corpus: English prose gathered at run time from the docstrings of what is
already installed (the Python standard library, numpy, torch), so `make pretrain` needs no download.

Each docstring (module, class, function or method, visited in sorted order) is one document. A
docstring is cleaned (`inspect.cleandoc`), cut into paragraphs at blank lines, paragraphs that
look like code, tables or parameter lists are dropped, and the rest is split into sentences by
`sentences.split_sentences`. Documents keep sentences of at least 4 words and need at least 2 of them. The
text depends only on the installed versions, which key the cache ($BERT_FAST_CACHE, default
~/.cache/bert_fast): the first build writes `corpus.txt` in the one-sentence-per-line format
(blank line between documents) that `prepare` reads; later runs reuse it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import platform
import re
import sys
import warnings
from pathlib import Path

from bert_fast.data.sentences import split_sentences
from bert_fast.fileio import atomic_path, exclusive

# Top-level standard-library modules, minus those with side effects on import (a browser, a GUI,
# an easter egg) or that do not exist on this platform.
_SKIP = set("antigravity this idlelib tkinter turtle turtledemo pydoc_data ensurepip venv lib2to3 msilib "
            "winreg winsound msvcrt nt tty pty curses readline webbrowser site test".split())
STDLIB = tuple(m for m in sorted(sys.stdlib_module_names) if not m.startswith("_") and m not in _SKIP)
LIBRARIES = tuple((
    "numpy numpy.linalg numpy.fft numpy.random numpy.ma numpy.polynomial torch torch.nn torch.nn.functional "
    "torch.optim torch.utils.data torch.distributions torch.linalg torch.fft torch.special torch.autograd "
    "torch.distributed torch.nn.utils torch.optim.lr_scheduler torch.sparse torch.testing").split())

_CODE_LIKE = re.compile(r"^\s*(>>>|\.\.\.|[-=~^*]{3,}|\$ |[A-Za-z_][\w.]* ?: ?[\w\[\], .|]*$)|::\s*$|[{};]$")


def _paragraphs(doc: str):
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) or _CODE_LIKE.search(line) for line in lines):
            continue
        yield " ".join(lines)


def document_sentences(doc: str | None) -> list[str]:
    if not isinstance(doc, str):
        return []
    out = []
    for paragraph in _paragraphs(doc):
        out += [s for s in split_sentences(paragraph) if len(s.split()) >= 4 and any(c.isalpha() for c in s)]
    return out


def _docstrings(module):
    """(qualified name, docstring) of a module and everything defined in it, sorted by name."""
    yield module.__name__, module.__doc__
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__ or name.startswith("_"):
            continue
        yield f"{module.__name__}.{name}", getattr(obj, "__doc__", None)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if not attr.startswith("_") and (inspect.isfunction(member) or inspect.isroutine(member)):
                    yield f"{module.__name__}.{name}.{attr}", getattr(member, "__doc__", None)


def gather_documents(modules=STDLIB + LIBRARIES) -> list[list[str]]:
    """Documents (lists of sentences) from the docstrings of `modules`, deduplicated, in order."""
    seen, documents = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # an optional module missing on this Python is simply left out
                continue
            for _, doc in _docstrings(module):
                sentences = document_sentences(doc)
                key = hashlib.sha1("\n".join(sentences).encode()).digest()
                if len(sentences) >= 2 and key not in seen:
                    seen.add(key)
                    documents.append(sentences)
    return documents


def cache_root() -> Path:
    return Path(os.environ.get("BERT_FAST_CACHE") or Path.home() / ".cache" / "bert_fast")


def corpus_key() -> str:
    import numpy
    import torch

    versions = f"v1 {platform.python_version()} numpy {numpy.__version__} torch {torch.__version__}"
    return hashlib.sha256(versions.encode()).hexdigest()[:16]


def default_corpus(root: Path | None = None) -> Path:
    """The embedded corpus as a text file (built on first use, then cached)."""
    path = (root or cache_root()) / f"corpus-{corpus_key()}" / "corpus.txt"
    if not path.exists():
        with exclusive(path.parent / ".corpus.lock"):
            if not path.exists():  # another process may have built it while this one waited
                documents = gather_documents()
                with atomic_path(path) as tmp:
                    tmp.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n", encoding="utf-8")
    return path


def prepared_folder(vocab_size: int = 8192, root: Path | None = None) -> Path:
    """Where `default_prepared` keeps the embedded corpus prepared with this vocab size (whether
    or not it is there yet)."""
    return (root or cache_root()) / f"corpus-{corpus_key()}" / f"prepared-v{vocab_size}"


def default_prepared(vocab_size: int = 8192, root: Path | None = None) -> Path:
    """The embedded corpus prepared (vocab trained on it, shards), cached next to corpus.txt.
    Shards of 32k tokens make several, so training can hold the last one out for evaluation."""
    from bert_fast.data.prepare import PrepareSettings, prepare

    text = default_corpus(root)
    folder = prepared_folder(vocab_size, root)
    prepare([text], folder, settings=PrepareSettings(vocab_size=vocab_size, shard_tokens=1 << 15))
    return folder
