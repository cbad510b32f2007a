"""Number-swapped negatives for a token-level agreement margin loss (Noji & Takamura, ACL 2020).

A plain LM sees only grammatical text. Noji & Takamura add, at every verb token of the training text,
a hinge on the log-likelihood margin between the observed form and its number-swapped form
("the dogs *bark*" vs "*barks*"): ``max(0, delta - (log P(w) - log P(swap(w))))``. It taught their
LSTMs agreement across attractors at a negligible cost in perplexity.

The verb pairs are the agreement checker's (:mod:`agreelens.lexicon`): is/are, was/were, has/have,
does/do and their n't forms, and each ``-s``/base pair of the vocabulary whose ``-s`` form follows
he/she/it and whose base form follows I/you/we/they, to or a modal at least ``min_count`` times in the
training text (nouns such as "cars" never follow a pronoun). In grammatical text the observed form beats
its swap in every context where either can stand (``he knows``, ``they know``, ``to know``), so the
margin is applied at every occurrence.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from agreelens.lexicon import AUX_PAIRS, morph_pairs, verb_evidence
from agreelens.vocab import Vocab


def find_verb_pairs(lines: Iterable[str], vocab: Vocab, min_count: int = 5) -> list[tuple[str, str]]:
    """(singular, plural) present-tense verb pairs of the whitespace-tokenized ``lines``, auxiliaries first."""
    aux = [(s, p) for s, p in AUX_PAIRS if s in vocab and p in vocab]
    verbs = verb_evidence(lines, min_singular=min_count, min_plural=min_count, pairs=morph_pairs(vocab))
    return aux + [(third, base) for base, third in verbs]


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
