"""Text normalisation, sentence splitting and word tokenization shared by training and scoring.

The same function turns corpus text, NA-task stimuli, benchmark sentences and a user's input into
model tokens, so what the LM is scored on is preprocessed exactly as what it was trained on:
Unicode NFKC, typographic quotes and dashes made plain, lowercased, words split from punctuation
(clitics such as ``'s`` and ``n't`` stay attached to their word, as in the training data).
"""

from __future__ import annotations

import re
import unicodedata

_PLAIN = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'", "`": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
        "\u2013": "-", "\u2014": "-", "\u2012": "-", "\u2212": "-", "\u00a0": " ",
    }
)
# a word: letters/digits with inner apostrophes, hyphens or dots (don't, well-known, 3.5, u.s.);
# anything else that is not a space is a token on its own (punctuation, symbols)
_TOKEN = re.compile(r"[^\W_]+(?:['.\-][^\W_]+)*'?|[^\w\s]|_", re.UNICODE)
# sentence boundary: . ! ? (optionally followed by closing quotes/brackets), then space and a capital,
# digit or opening quote
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e|U\.S|U\.K|No)\.$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_PLAIN)
    return _CONTROL.sub(" ", text)


def tokenize(text: str) -> list[str]:
    """``"The boy's dogs don't bark."`` -> ``['the', "boy's", 'dogs', "don't", 'bark', '.']``"""
    return _TOKEN.findall(normalize(text).lower())


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph at sentence-final punctuation followed by a capitalised word."""
    paragraph = normalize(paragraph).strip()
    if not paragraph:
        return []
    pieces, start = [], 0
    for m in _SENT_END.finditer(paragraph):
        candidate = paragraph[start : m.start()]
        if _ABBREV.search(candidate):
            continue
        pieces.append(paragraph[start : m.end()].strip())
        start = m.end()
    pieces.append(paragraph[start:].strip())
    return [p for p in pieces if p]
