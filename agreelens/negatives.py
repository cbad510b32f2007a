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

Most of those verbs follow their subject directly, where agreeing with the nearest noun is right too.
:func:`attractor_flags` marks the verbs whose nearest preceding noun has the other number ("the boy near
the cars *knows*"): in grammatical text the verb's own form gives the subject's number, so no parse is
needed. ``train.attractor_weight`` multiplies the margin term at those verbs.

:func:`number_loss` is the auxiliary objective of Linzen et al. (2016) and Enguehard et al. (2017): at the
same verb tokens, a linear readout of the features that predict the verb must tell the verb's number
(the subject's), a logistic loss on the state itself rather than on the decoder's two logits.

The same hinge can hold at nouns: :func:`determiner_flags` marks each noun right after a determiner of its
number ("*these* books", "*a* book"; :data:`agreelens.lexicon.NUMBER_DETERMINERS`), where the observed form
must beat its swap; ``train.noun_weight`` is the margin term's weight there, and other nouns get none.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from agreelens.lexicon import (AUX_PAIRS, NOMINAL_PREV, NONFINITE_PREV, NUMBER_DETERMINERS, PLURAL_PRONOUNS,
                               SINGULAR_PRONOUNS, morph_pairs, verb_evidence)
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


def noun_pairs(vocab: Vocab, verb_pairs: Iterable[tuple[str, str]], exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(singular, plural) noun pairs: the ``(w, w+s)`` vocabulary pairs (and irregular nouns) with no word of
    ``verb_pairs`` or ``exclude``."""
    skip = {w for pair in verb_pairs for w in pair} | set(exclude)
    return [(sg, pl) for sg, pl in morph_pairs(vocab) if sg not in skip and pl not in skip]


def determiner_flags(ids: np.ndarray, vocab: Vocab, nouns: Iterable[tuple[str, str]]) -> np.ndarray:
    """(N,) bool over the token stream ``ids``: True at each noun of ``nouns`` right after a determiner of its
    own number ("these books", "a book"; not "these grocery stores" at "grocery")."""
    number = np.zeros(len(vocab), dtype=np.int8)
    for sg, pl in nouns:
        number[vocab.index(sg)], number[vocab.index(pl)] = 1, -1
    det = np.zeros(len(vocab), dtype=np.int8)
    for w, n in NUMBER_DETERMINERS.items():
        if w in vocab:
            det[vocab.index(w)] = n
    if len(ids) < 2:
        return np.zeros(len(ids), dtype=bool)
    prev = np.concatenate([[0], det[ids[:-1]]])
    return (number[ids] != 0) & (number[ids] == prev)


def attractor_flags(ids: np.ndarray, vocab: Vocab, pairs: Iterable[tuple[str, str]],
                    swap: torch.Tensor) -> np.ndarray:
    """(N,) bool over the token stream ``ids`` (sentences ended by ``<eos>``): True at each margin-loss
    verb (``swap`` >= 0) whose nearest preceding noun in its sentence has the other number. A pronoun
    closer to the verb is its subject (the boys say *it* works), a word after to/a modal is not finite
    and one after a determiner or preposition is a noun (the end, after work): none of these is marked.
    Nouns are the ``(w, w+s)`` vocabulary pairs that are not verbs of ``pairs``."""
    number = np.zeros(len(vocab), dtype=np.int8)  # noun number: 1 singular, -1 plural, 2 a stop
    for sg, pl in noun_pairs(vocab, pairs):
        number[vocab.index(sg)], number[vocab.index(pl)] = 1, -1
    for w in (*SINGULAR_PRONOUNS, *PLURAL_PRONOUNS, "<eos>"):
        if w in vocab:
            number[vocab.index(w)] = 2
    verb_number = verb_numbers(swap, vocab, pairs).numpy()
    is_verb = verb_number != 0
    nonfinite = np.zeros(len(vocab), dtype=bool)
    nonfinite[[vocab.index(w) for w in NONFINITE_PREV | NOMINAL_PREV if w in vocab]] = True
    if not len(ids):
        return np.zeros(0, dtype=bool)
    kind = number[ids]
    pos = np.arange(len(ids))
    last = np.maximum.accumulate(np.where(kind != 0, pos, -1))  # the last noun or stop at or before each token
    before = np.concatenate([[-1], last[:-1]])
    prev_ok = np.concatenate([[False], ~nonfinite[ids[:-1]]])
    noun = np.where(before >= 0, kind[np.maximum(before, 0)], 0)
    return is_verb[ids] & prev_ok & (np.abs(noun) == 1) & (noun != verb_number[ids])


def margin_loss(model, features: torch.Tensor, targets: torch.Tensor, swap: torch.Tensor,
                delta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over pair-word targets of ``max(0, delta - (log P(target) - log P(swap(target))))``, each times
    its entry of ``weights`` (same shape as ``targets``; None: 1; 0 leaves the target out), divided by the
    number of targets (so its scale matches the per-token LM loss)."""
    other = swap[targets]
    mask = other >= 0
    if weights is not None:
        mask = mask & (weights > 0)
    if not bool(mask.any()):
        return features.sum() * 0.0  # keeps every parameter in the graph (DDP)
    margins = model.target_margin(features[mask], targets[mask], other[mask])
    hinge = torch.relu(delta - margins)
    if weights is not None:
        hinge = hinge * weights[mask]
    return hinge.sum() / targets.numel()


def verb_numbers(swap: torch.Tensor, vocab: Vocab, pairs: Iterable[tuple[str, str]]) -> torch.Tensor:
    """(V,) int8: 1 at each singular form of the margin-loss pairs (``swap`` >= 0), -1 at each plural, else 0."""
    out = torch.zeros(len(vocab), dtype=torch.int8)
    for sg, pl in pairs:
        if sg in vocab and pl in vocab and swap[vocab.index(sg)] >= 0:
            out[vocab.index(sg)], out[vocab.index(pl)] = 1, -1
    return out


def number_loss(head: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor, verb_number: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over verb targets (``verb_number`` != 0) of the logistic loss of ``head(features)`` (the logit of
    "singular") against the verb's number, each times its entry of ``weights`` (None: 1), divided by the
    number of targets like :func:`margin_loss`."""
    sign = verb_number[targets]
    mask = sign != 0
    if not bool(mask.any()):
        return features.sum() * 0.0 + sum(p.sum() for p in head.parameters()) * 0.0  # every parameter in the graph
    logits = head(features[mask].float()).squeeze(-1).float()
    w = weights[mask].float() if weights is not None else None
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, (sign[mask] > 0).float(), weight=w,
                                                                reduction="sum")
    return loss / targets.numel()
