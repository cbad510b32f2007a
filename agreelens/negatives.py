"""Number-swapped negatives for a token-level agreement margin loss (Noji & Takamura, ACL 2020).

A plain LM sees only grammatical text. Noji & Takamura add, at every verb token of the training text,
a hinge on the log-likelihood margin between the observed form and its number-swapped form
("the dogs *bark*" vs "*barks*"): ``max(0, delta - (log P(w) - log P(swap(w))))``. It taught their
LSTMs agreement across attractors at a negligible cost in perplexity.

The verb pairs are found in the training text itself, without a tagger: ``(-s form, base form)``
candidates where both are in the vocabulary, the -s form follows he/she/it and the base form follows
they/we/i/you often enough, the -s form is rarely preceded by a determiner (nouns such as "cars" are
out), and the base form also follows "to" or a modal (so "sometimes"/"sometime" is out). The copula
and auxiliaries (is/are, was/were, has/have, does/do, and their n't forms) are listed, as they are
irregular. In grammatical text the observed form beats its swap in every context where either can
stand (``he knows``, ``they know``, ``to know``), so the margin is applied at every occurrence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from agreelens.vocab import Vocab

IRREGULAR = [("is", "are"), ("was", "were"), ("has", "have"), ("does", "do"), ("isn't", "aren't"),
             ("wasn't", "weren't"), ("hasn't", "haven't"), ("doesn't", "don't")]
_SG_SUBJ = ("he", "she", "it")
_PL_SUBJ = ("they", "we", "i", "you")
_BASE_CUE = ("to", "will", "can", "could", "would", "should", "must", "might", "may", "don't", "didn't")
_DET = ("the", "a", "an", "his", "her", "my", "your", "their", "our", "this", "these", "those", "its")


def _bases(word: str) -> list[str]:
    """Base-form candidates of an -s form: tries -> try, watches -> watch, knows -> know."""
    out = []
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


def find_verb_pairs(lines: Iterable[str], vocab: Vocab, min_count: int = 5) -> list[tuple[str, str]]:
    """(singular, plural) present-tense verb pairs of the whitespace-tokenized ``lines``, irregular first."""
    bigrams: Counter = Counter()
    for line in lines:
        toks = line.split()
        bigrams.update(zip(toks, toks[1:]))
    pairs = [(s, p) for s, p in IRREGULAR if s in vocab and p in vocab]
    taken = {w for pair in pairs for w in pair}
    found = []
    for word in vocab.itos:
        if word in taken:
            continue
        for base in _bases(word):
            if base not in vocab or base in taken:
                continue
            sg = sum(bigrams[(s, word)] for s in _SG_SUBJ)
            pl = sum(bigrams[(p, base)] for p in _PL_SUBJ)
            det = sum(bigrams[(d, word)] for d in _DET)
            cue = sum(bigrams[(c, base)] for c in _BASE_CUE)
            if sg >= min_count and pl >= min_count and det <= sg // 2 and cue >= 1:
                found.append((sg + pl, word, base))
                break
    found.sort(key=lambda f: (-f[0], f[1]))
    return pairs + [(w, b) for _, w, b in found]


def swap_table(pairs: Iterable[tuple[str, str]], vocab: Vocab, exclude: Iterable[str] = ()) -> torch.Tensor:
    """(V,) long tensor: the id of each pair word's other form, -1 for every other word.
    Pairs with a word in ``exclude`` (either form) are left out."""
    excluded = set(exclude)
    table = torch.full((len(vocab),), -1, dtype=torch.long)
    for sg, pl in pairs:
        if sg in excluded or pl in excluded or sg not in vocab or pl not in vocab:
            continue
        table[vocab.index(sg)] = vocab.index(pl)
        table[vocab.index(pl)] = vocab.index(sg)
    return table


def margin_loss(model, features: torch.Tensor, targets: torch.Tensor, swap: torch.Tensor,
                delta: float) -> torch.Tensor:
    """Sum over pair-word targets of ``max(0, delta - (log P(target) - log P(swap(target))))``,
    divided by the number of targets (so its scale matches the per-token LM loss)."""
    other = swap[targets]
    mask = other >= 0
    if not bool(mask.any()):
        return features.sum() * 0.0  # keeps every parameter in the graph (DDP)
    margins = model.target_margin(features[mask], targets[mask], other[mask])
    return torch.relu(delta - margins).sum() / targets.numel()
