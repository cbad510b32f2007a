"""Vocabulary (the ``Dictionary`` of pytorch/examples word_language_model), frequency-ordered.

Index order is by descending training frequency, so the adaptive softmax's cutoffs put frequent words
in its head. ``<unk>`` and ``<eos>`` are always present.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

UNK = "<unk>"
EOS = "<eos>"


class Vocab:
    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = list(words)
        if len(set(self.itos)) != len(self.itos):
            raise ValueError("vocabulary has duplicate entries")
        for special in (UNK, EOS):
            if special not in self.itos:
                raise ValueError(f"vocabulary lacks the special token {special}")
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk = self.stoi[UNK]
        self.eos = self.stoi[EOS]

    @classmethod
    def build(cls, counts: Counter, min_count: int, max_size: int) -> "Vocab":
        """Words seen at least ``min_count`` times, most frequent first, ``max_size`` in all."""
        specials = [EOS, UNK]
        ranked = sorted(
            ((w, c) for w, c in counts.items() if c >= min_count and w not in specials),
            key=lambda wc: (-wc[1], wc[0]),
        )
        # <eos> is the most frequent token of any corpus split into sentences; <unk> goes in the head too
        return cls(specials + [w for w, _ in ranked[: max(0, max_size - len(specials))]])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def index(self, word: str) -> int:
        return self.stoi.get(word, self.unk)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        get, unk = self.stoi.get, self.unk
        return [get(t, unk) for t in tokens]

    def encode_lines(self, lines: Iterable[str]) -> torch.Tensor:
        """Whitespace-tokenized sentences -> one id stream, each sentence followed by <eos>."""
        ids: list[int] = []
        get, unk, eos = self.stoi.get, self.unk, self.eos
        for line in lines:
            ids.extend(get(t, unk) for t in line.split())
            ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(self.itos) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        return cls(Path(path).read_text(encoding="utf-8").splitlines())
