"""Number alternates of English words, found from the vocabulary and the training text: the word lists
and rules the agreement checker (:mod:`agreelens.checker`) and the agreement margin loss
(:mod:`agreelens.negatives`) share, so both agree on what a verb is.
"""

from __future__ import annotations

from collections import Counter

from agreelens.vocab import Vocab

AUX_PAIRS = [("is", "are"), ("was", "were"), ("has", "have"), ("does", "do"), ("isn't", "aren't"),
             ("wasn't", "weren't"), ("hasn't", "haven't"), ("doesn't", "don't")]  # (singular, plural)
DEMONSTRATIVES = {"this": "these", "these": "this", "that": "those", "those": "that"}
IRREGULAR_NOUNS = [("man", "men"), ("woman", "women"), ("child", "children"), ("person", "people"),
                   ("foot", "feet"), ("tooth", "teeth"), ("mouse", "mice"), ("goose", "geese"),
                   ("ox", "oxen"), ("louse", "lice")]
# closed-class words: never a lexicon verb or noun, whatever their spelling (i/is, it/its, a/as, ...)
CLOSED = frozenset("""
i a an as u us it its is he his hi her hers our ours your yours their theirs this thi was has does
do dos gos no nos yes the thus perhaps always news lots whereas sometimes besides towards
afterwards nowadays across unless less les pas bus gas plus ones one""".split())
# after these a verb form is non-finite (to like, will like, doesn't like, not like)
NONFINITE_PREV = frozenset("""
to will would can could shall should may might must did didn't don't doesn't won't can't cannot
couldn't wouldn't shouldn't mustn't shan't let let's not i'll you'll we'll they'll he'll she'll it'll
i'd you'd we'd they'd he'd she'd""".split())
# after these a w/w+s word is a noun, not a verb (the walks, my needs, in plans, two cats)
NOMINAL_PREV = frozenset("""
the a an my your his her its our their this that these those some any no every each many few several
all both much more most such what which whose of in on at for with from by about into onto over under
after before between through during without within against among two three four five six seven eight
nine ten twenty hundred thousand one another other""".split())
# no subject before the site yet: an inverted question or an expletive (where are the boys, there is)
OPENERS = frozenset("""
what where when why how who whom which whose there here and but so or then well oh yes no now""".split())
EXPLETIVES = frozenset({"there", "here"})
# determiners that fix the number of the noun right after them (1 singular, -1 plural); "that" is left out,
# being also a conjunction and a relative pronoun ("the book that students read")
NUMBER_DETERMINERS = {"a": 1, "an": 1, "this": 1, "each": 1, "every": 1, "another": 1,
                      "these": -1, "those": -1, "many": -1, "several": -1, "both": -1, "few": -1}
SINGULAR_PRONOUNS = ("he", "she", "it")
PLURAL_PRONOUNS = ("i", "you", "we", "they")
ADVERBS = frozenset("""never always often usually sometimes also still just really only even already
rarely seldom hardly probably certainly actually""".split())
BASE_PREV = frozenset(NONFINITE_PREV - {"not", "let", "let's"})


def morph_pairs(vocab: Vocab | set[str]) -> list[tuple[str, str]]:
    """``(w, w+s)`` pairs of vocabulary words: w+s, w+es (after s, x, z, ch, sh, o), y -> ies after a
    consonant, and the irregular nouns; closed-class words are left out."""
    words = vocab.stoi if isinstance(vocab, Vocab) else set(vocab)
    out: list[tuple[str, str]] = []
    for w in words:
        if not w.isalpha() or len(w) < 2 or w in CLOSED:
            continue
        cands = [w + "s"]
        if w.endswith(("s", "x", "z", "ch", "sh", "o")):
            cands.append(w + "es")
        if len(w) > 2 and w.endswith("y") and w[-2] not in "aeiou":
            cands.append(w[:-1] + "ies")
        out += [(w, c) for c in cands if c in words and c not in CLOSED]
    out += [(s, p) for s, p in IRREGULAR_NOUNS if s in words and p in words]
    return sorted(set(out))


def verb_evidence(lines, min_singular: int = 1, min_plural: int = 2,
                  pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The ``(base, third)`` pairs that whitespace-tokenized ``lines`` use as verbs: the -s form after
    he/she/it (an adverb may stand between) at least ``min_singular`` times, the base after
    I/you/we/they, a modal, to or do-support at least ``min_plural`` times. Nouns (boy/boys) never
    follow a pronoun, so they drop out."""
    sg, pl = Counter(), Counter()
    for line in lines:
        toks = line.split()
        for i, w in enumerate(toks):
            if not i:
                continue
            p = toks[i - 1]
            pp = toks[i - 2] if i > 1 else ""
            if p in SINGULAR_PRONOUNS or (p in ADVERBS and pp in SINGULAR_PRONOUNS):
                sg[w] += 1
            if p in PLURAL_PRONOUNS or p in BASE_PREV or (p in ADVERBS and pp in PLURAL_PRONOUNS):
                pl[w] += 1
    irregular = {p for _, p in IRREGULAR_NOUNS}
    return [(b, s) for b, s in (pairs or []) if s not in irregular and sg[s] >= min_singular and pl[b] >= min_plural]
