"""Sentence splitting of prose, shared by the embedded corpus (corpus.py) and prepare's JSONL
reader (prepare/inputs.py), which otherwise would import each other."""

from __future__ import annotations

import re

# A sentence ends at . ! or ? (optionally followed by one closing quote or bracket), then whitespace,
# then a capital letter, digit or opening quote/bracket.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph of prose (see _SENTENCE_END); whitespace runs become one space."""
    text = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(text) if s]
