"""Where number agreement can be checked in a sentence: the verb lexicon and the agreement *sites*.

A *site* is a word with a singular/plural alternate in a position where number agreement decides
between the two:

``aux``
    is/are, was/were, has/have, does/do and their n't forms (isn't/aren't, ...).
``verb``
    a present-tense verb from the lexicon (likes/like: pairs of vocabulary words w/w+s, w/w+es,
    y/ies that the training text uses as verbs, see :func:`build_lexicon`).
``noun``
    the noun right after this/these/that/those (``these car``). A left-to-right LM judges a determiner
    from its left context only, so the determiner-noun pair is judged at the noun, as BLiMP's
    one-prefix method does; the other fix (changing the determiner) is given as ``alternative``.
``there``
    is/are, was/were after an expletive there/here (``there is many reasons``): the verb agrees with the
    noun that *follows* it, so the site is judged over the words from the verb to that noun
    (``span_end``), both forms of the verb read in full.
``quantified``
    the finite verb of a sentence-initial quantified subject (``each of the students``, ``one of my
    friends``, ``everyone``, ``nobody``): the subject is singular whatever nouns follow (``subject_number``).
``coordinated``
    the finite verb of a sentence-initial subject of two noun phrases joined by *and* (``my brother and my
    sister``): plural.

A verb or auxiliary is a site only in a finite position: not first in its sentence (questions put the
auxiliary before its subject), not after to/modals/do-support/not, not after an opening wh-word; a
lexicon verb also not after a determiner, possessive, preposition or number (then it is a noun: "the
walks"). Quantified and coordinated subjects are read from the words alone (no parser): the site is the
first verb after the subject that does not open a relative clause (after that/who/which) or belong to a
pronoun of its own ("one of the things *I* like is").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from agreelens.lexicon import (
    AUX_PAIRS, CLOSED, DEMONSTRATIVES, EXPLETIVES, IRREGULAR_NOUNS, NOMINAL_PREV, NONFINITE_PREV, OPENERS,
    PLURAL_PRONOUNS, SINGULAR_PRONOUNS, morph_pairs, verb_evidence,
)
from agreelens.model import device_of, evaluating
from agreelens.text import _TOKEN, normalize
from agreelens.vocab import Vocab

KINDS = ("aux", "verb", "noun", "there", "quantified", "coordinated")
QUANTIFIERS = frozenset({"each", "one", "either", "neither"})  # + of: "each of the boys"
INDEFINITES = frozenset("""everyone everybody everything someone somebody something anyone anybody anything
nobody nothing""".split())
RELATIVIZERS = frozenset({"that", "who", "which", "whom", "whose"})
PRONOUNS = frozenset({*SINGULAR_PRONOUNS, *PLURAL_PRONOUNS})
PREPOSITIONS = frozenset("""of in on at for with from by about into onto over under after before between through
during without within against among near like behind""".split())
THERE_REACH = 4  # words after there + verb searched for the noun the verb agrees with

# ---------------------------------------------------------------------------------------- lexicon


@dataclass
class Lexicon:
    """Number alternates: auxiliaries, verbs (``(base, third)``) and nouns (``(singular, plural)``)."""

    verbs: list[tuple[str, str]]
    nouns: list[tuple[str, str]]
    source: str = "morphology"

    def __post_init__(self):
        self.aux = {}
        for s, p in AUX_PAIRS:
            self.aux[s], self.aux[p] = (p, "singular"), (s, "plural")
        self.verb = {}
        for b, s in self.verbs:
            self.verb[s], self.verb[b] = (b, "singular"), (s, "plural")
        self.noun = {}
        for s, p in self.nouns:
            self.noun[s], self.noun[p] = (p, "singular"), (s, "plural")

    @classmethod
    def from_vocab(cls, vocab: Vocab, verbs: list[tuple[str, str]] | None = None, source: str = "") -> "Lexicon":
        """Nouns: every morphological pair of the vocabulary; verbs: ``verbs`` (kept where both forms
        are in the vocabulary), else every regular morphological pair (no corpus to tell verbs from
        nouns)."""
        pairs = morph_pairs(vocab)
        if verbs is None:
            irregular = set(IRREGULAR_NOUNS)
            verbs, source = [p for p in pairs if p not in irregular], source or "morphology"
        verbs = [(b, s) for b, s in verbs if b in vocab and s in vocab and b not in CLOSED and s not in CLOSED]
        return cls(sorted({tuple(v) for v in verbs}), pairs, source or "corpus")

    def to_dict(self) -> dict:
        return {"source": self.source, "verbs": [list(v) for v in self.verbs]}


def lm_verbs(model: nn.Module, vocab: Vocab, pairs: list[tuple[str, str]], margin: float = 0.0) -> list[tuple[str, str]]:
    """The ``(base, third)`` pairs the LM itself treats as verbs: the -s form is more probable after
    he/she/it than after a determiner (the, a, my, two), and the base more probable after
    I/you/we/they than after a determiner, each by more than ``margin`` nats (mean log-probabilities
    over the contexts; one forward pass of 11 two-token contexts)."""
    contexts = [*SINGULAR_PRONOUNS, *PLURAL_PRONOUNS, "the", "a", "my", "two"]
    if not pairs or any(c not in vocab.stoi for c in contexts):
        return []
    device = device_of(model)
    ids = torch.tensor([[vocab.eos, vocab.stoi[c]] for c in contexts], device=device).t()
    with evaluating(model):
        features, _ = model(ids)
        lp = model.log_probs(features[-1]).double().cpu()  # (11, V)
    n_sg, n_pl = len(SINGULAR_PRONOUNS), len(PLURAL_PRONOUNS)
    sg = lp[:n_sg].logsumexp(0) - math.log(n_sg)
    pl = lp[n_sg:n_sg + n_pl].logsumexp(0) - math.log(n_pl)
    nominal = lp[n_sg + n_pl:].logsumexp(0) - math.log(len(contexts) - n_sg - n_pl)
    irregular = set(IRREGULAR_NOUNS)
    out = []
    for b, s in pairs:
        if (b, s) in irregular:
            continue
        bi, si = vocab.stoi[b], vocab.stoi[s]
        if sg[si] - nominal[si] > margin and pl[bi] - nominal[bi] > margin:
            out.append((b, s))
    return out


def build_lexicon(vocab: Vocab, train_files: list[str | Path] = (), model: nn.Module | None = None) -> Lexicon:
    """Verbs: those the training text uses as verbs (:func:`verb_evidence`, where a file exists) and
    those the LM treats as verbs (:func:`lm_verbs`, given ``model``); with neither, every regular
    morphological pair of the vocabulary."""
    files = [Path(f) for f in train_files if Path(f).is_file()]
    pairs = morph_pairs(vocab)
    verbs: set[tuple[str, str]] = set()
    sources = []
    if files:
        def lines():
            for f in files:
                with f.open(encoding="utf-8") as fh:
                    yield from fh

        verbs |= set(verb_evidence(lines(), pairs=pairs))
        sources.append(",".join(f.name for f in files))
    if model is not None:
        found = lm_verbs(model, vocab, pairs)
        if found:
            verbs |= set(found)
            sources.append("lm")
    if not sources:
        return Lexicon.from_vocab(vocab)
    return Lexicon.from_vocab(vocab, sorted(verbs), source="+".join(sources))



# ---------------------------------------------------------------------------------------- sites


@dataclass
class Site:
    position: int  # token index in its sentence
    word: str
    alternate: str
    kind: str  # one of KINDS
    number: str  # what the written form agrees with: singular | plural
    controller: int | None = None  # the determiner's position (noun sites), the noun's (there sites)
    span_end: int | None = None  # there sites: the last word judged (the noun the verb agrees with)
    subject: str | None = None  # quantified/coordinated: the subject's words
    subject_number: str | None = None  # ... and the number they require


def _finite(tokens: list[str], i: int) -> bool:
    """Can the word at ``i`` be a finite verb whose subject is to its left?"""
    if i == 0:
        return False
    prev = tokens[i - 1]
    if prev in NONFINITE_PREV or prev in EXPLETIVES:
        return False
    return not all(t in OPENERS or not t[0].isalnum() for t in tokens[:i])


def _site(i: int, w: str, tokens: list[str], lexicon: "Lexicon") -> Site | None:
    prev = tokens[i - 1] if i else ""
    if w in lexicon.aux and prev in EXPLETIVES and i + 1 < len(tokens):
        noun = next((j for j in range(i + 1, min(len(tokens), i + 1 + THERE_REACH)) if tokens[j] in lexicon.noun), None)
        if noun is None:
            return None
        alt, num = lexicon.aux[w]
        return Site(i, w, alt, "there", num, controller=noun, span_end=noun)
    if w in lexicon.aux and _finite(tokens, i):
        alt, num = lexicon.aux[w]
        return Site(i, w, alt, "aux", num)
    if prev == "that" and w in lexicon.verb:  # the man that likes (these/those + verb is a noun: these plans)
        alt, num = lexicon.verb[w]
        return Site(i, w, alt, "verb", num)
    if prev in DEMONSTRATIVES and w in lexicon.noun:  # these car
        alt, num = lexicon.noun[w]
        return Site(i, w, alt, "noun", num, controller=i - 1)
    if w in lexicon.verb and prev not in NOMINAL_PREV and not prev.endswith("'s") and _finite(tokens, i):
        alt, num = lexicon.verb[w]
        return Site(i, w, alt, "verb", num)
    return None


def subject_pattern(tokens: list[str], verb: int) -> tuple[str, str, int] | None:
    """``(kind, number, first word after the subject's head)`` for a sentence-initial quantified subject, or
    a coordinated one ending right before the verb at ``verb``; else None (see the module docstring)."""
    if tokens[:1] and tokens[0] in INDEFINITES:
        return "quantified", "singular", 1
    if len(tokens) > 2 and tokens[0] in QUANTIFIERS and tokens[1] == "of":
        return "quantified", "singular", 2
    if tokens[:3] == ["every", "one", "of"]:
        return "quantified", "singular", 3
    head = tokens[:verb]
    if not 3 <= len(head) <= 8 or head.count("and") != 1 or head[0] in ("either", "neither", "and") \
            or head[-1] == "and":
        return None
    if any(not t.isalpha() or t in PREPOSITIONS or t in RELATIVIZERS or t in OPENERS - {"and"} for t in head):
        return None
    return "coordinated", "plural", verb


def find_sites(tokens: list[str], lexicon: "Lexicon", vocab: Vocab | None = None) -> list[Site]:
    """The agreement sites of one tokenized sentence (see the module's docstring for the rules)."""
    sites = []
    for i, w in enumerate(tokens):
        site = _site(i, w, tokens, lexicon)
        if site is not None and (vocab is None or (w in vocab.stoi and site.alternate in vocab.stoi)):
            sites.append(site)
    verbs = [s for s in sites if s.kind in ("aux", "verb")]
    pattern = subject_pattern(tokens, verbs[0].position) if verbs else None
    if pattern is not None:
        kind, number, after = pattern
        for s in verbs:
            prev = tokens[s.position - 1]
            if s.position < after or prev in RELATIVIZERS or prev in PRONOUNS:
                continue
            s.kind, s.subject, s.subject_number = kind, " ".join(tokens[:s.position]), number
            break
    return sites


def token_spans(sentence: str) -> list[tuple[int, int]] | None:
    """Character spans of :func:`tokenize`'s tokens in ``sentence`` (normalized text), or None where
    lowercasing changed the text's length."""
    norm = normalize(sentence)
    low = norm.lower()
    if len(low) != len(norm):
        return None
    return [m.span() for m in _TOKEN.finditer(low)]


def _match_case(word: str, original: str) -> str:
    if original.isupper() and len(original) > 1:
        return word.upper()
    if original[:1].isupper():
        return word[:1].upper() + word[1:]
    return word

