"""Agreement checker: find number-agreement sites in a text, judge each with the LM, explain a verdict.

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

A verb or auxiliary is a site only in a finite position: not first in its sentence (questions put the
auxiliary before its subject), not after to/modals/do-support/not, not after there/here or an opening
wh-word; a lexicon verb also not after a determiner, possessive, preposition or number (then it is a
noun: "the walks").

The verdict of a site is read off one number, its margin ``log P(written | prefix) - log P(alternate |
prefix)`` (the sentence's words to its left, primed with ``<eos>`` as in training): below the calibrated
threshold the written form is flagged as an error and the alternate suggested. One batched LM forward
over all sentences gives every site's margin (``model.target_margin`` on the hidden states: only the
two words' logits). ``confidence`` is ``sigmoid(scale * |margin - threshold|)``, the calibrated
probability that the verdict is right.

Text is split into sentences and tokenized exactly as the training corpus was (:mod:`agreelens.text`);
words outside the vocabulary are read as ``<unk>`` and reported.

:func:`calibrate` picks the threshold that maximises F1 of error detection on held-out pairs (BLiMP's
agreement sets and test-split sentences with one site swapped to its alternate) and writes
``metrics/calibration_<model>.json``. :meth:`Checker.explain` traces a site's sentence: the number
units' gates and states per token, a diagnostic readout of the subject's number from layer 2, and the
site's margin with each number unit ablated (the masks of ``agreelens ablate``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from agreelens.lexicon import (  # noqa: F401  (re-exported: the checker's lexicon API)
    AUX_PAIRS, DEMONSTRATIVES, IRREGULAR_NOUNS, CLOSED, NONFINITE_PREV, NOMINAL_PREV, OPENERS,
    EXPLETIVES, SINGULAR_PRONOUNS, PLURAL_PRONOUNS, ADVERBS, BASE_PREV, morph_pairs, verb_evidence,
)
from agreelens.text import _TOKEN, normalize, split_sentences, tokenize
from agreelens.vocab import Vocab

log = logging.getLogger("agreelens.checker")

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
    device = _device(model)
    ids = torch.tensor([[vocab.eos, vocab.stoi[c]] for c in contexts], device=device).t()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            features, _ = model(ids)
            lp = model.log_probs(features[-1]).double().cpu()  # (11, V)
    finally:
        model.train(was_training)
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


# ---------------------------------------------------------------------------------------- input


class InputError(ValueError):
    """Bad input to the checker; ``status`` is the HTTP status a service answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


_BAD_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def validate_text(text, max_chars: int = 5000, max_sentences: int = 50) -> list[str]:
    """The text's sentences, or :class:`InputError` for non-strings (400), texts over ``max_chars``
    characters (413), control characters other than tab/newline/CR (400), empty or blank text (400)
    and more than ``max_sentences`` sentences (413)."""
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise InputError(f"text has {len(text):,} characters; the limit is {max_chars:,}", 413)
    bad = _BAD_CONTROL.search(text)
    if bad:
        raise InputError(f"text contains the control character U+{ord(bad.group()):04X} at offset {bad.start()}")
    if not text.strip():
        raise InputError("text is empty")
    sentences = split_sentences(text)
    if not sentences:
        raise InputError("text has no sentence")
    if len(sentences) > max_sentences:
        raise InputError(f"text has {len(sentences)} sentences; the limit is {max_sentences}", 413)
    return sentences


# ---------------------------------------------------------------------------------------- sites


@dataclass
class Site:
    position: int  # token index in its sentence
    word: str
    alternate: str
    kind: str  # aux | verb | noun
    number: str  # what the written form agrees with: singular | plural
    controller: int | None = None  # the determiner's position (noun sites)


def _finite(tokens: list[str], i: int) -> bool:
    """Can the word at ``i`` be a finite verb whose subject is to its left?"""
    if i == 0:
        return False
    prev = tokens[i - 1]
    if prev in NONFINITE_PREV or prev in EXPLETIVES:
        return False
    return not all(t in OPENERS or not t[0].isalnum() for t in tokens[:i])


def find_sites(tokens: list[str], lexicon: Lexicon, vocab: Vocab | None = None) -> list[Site]:
    """The agreement sites of one tokenized sentence (see the module's docstring for the rules)."""
    sites = []
    for i, w in enumerate(tokens):
        site = None
        prev = tokens[i - 1] if i else ""
        if w in lexicon.aux and _finite(tokens, i):
            alt, num = lexicon.aux[w]
            site = Site(i, w, alt, "aux", num)
        elif prev == "that" and w in lexicon.verb:  # the man that likes (these/those + verb is a noun: these plans)
            alt, num = lexicon.verb[w]
            site = Site(i, w, alt, "verb", num)
        elif prev in DEMONSTRATIVES and w in lexicon.noun:  # these car
            alt, num = lexicon.noun[w]
            site = Site(i, w, alt, "noun", num, controller=i - 1)
        elif w in lexicon.verb and prev not in NOMINAL_PREV and not prev.endswith("'s") and _finite(tokens, i):
            alt, num = lexicon.verb[w]
            site = Site(i, w, alt, "verb", num)
        if site is not None and (vocab is None or (w in vocab.stoi and site.alternate in vocab.stoi)):
            sites.append(site)
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


# ---------------------------------------------------------------------------------------- margins


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def site_margins(model: nn.Module, vocab: Vocab, sentences: list[list[str]], sites: list[tuple[int, int, int, int]],
                 batch_size: int = 256) -> torch.Tensor:
    """``log P(written) - log P(alternate)`` at each site ``(sentence, position, written id, alternate
    id)``: the sentences (primed with ``<eos>``) run through the LM in padded batches of ``batch_size``
    (longest first), one forward per batch, and the two words' scores are read at each site's prefix.
    Returns float64 margins on the CPU in the order of ``sites``."""
    out = torch.empty(len(sites), dtype=torch.float64)
    if not sites:
        return out
    device = _device(model)
    by_sentence: dict[int, list[int]] = {}
    for k, (s, *_rest) in enumerate(sites):
        by_sentence.setdefault(s, []).append(k)
    order = sorted(by_sentence, key=lambda s: -len(sentences[s]))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                chunk = order[lo:lo + batch_size]
                seqs = [torch.tensor([vocab.eos, *vocab.encode(sentences[s])], dtype=torch.long) for s in chunk]
                ids = pad_sequence(seqs, padding_value=vocab.eos).to(device)  # (T, B)
                features, _ = model(ids)
                rows = [k for s in chunk for k in by_sentence[s]]
                col = {s: j for j, s in enumerate(chunk)}
                t = torch.tensor([sites[k][1] for k in rows], device=device)
                b = torch.tensor([col[sites[k][0]] for k in rows], device=device)
                feats = features[t, b]
                good = torch.tensor([sites[k][2] for k in rows], device=device)
                bad = torch.tensor([sites[k][3] for k in rows], device=device)
                if hasattr(model, "target_margin"):
                    m = model.target_margin(feats, good, bad)
                else:
                    lp = model.target_log_probs(feats.unsqueeze(1).expand(-1, 2, -1), torch.stack([good, bad], 1))
                    m = lp[:, 0] - lp[:, 1]
                out[torch.tensor(rows)] = m.double().cpu()
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------- checker


@dataclass
class Checker:
    """A loaded LM with its lexicon and calibration; :meth:`check`, :meth:`explain`, :meth:`score`."""

    model: nn.Module
    vocab: Vocab
    lexicon: Lexicon
    threshold: float = 0.0
    scale: float = 1.0
    name: str = "model"
    calibrated: bool = False
    units: list[int] = field(default_factory=list)
    stimuli: object = None  # StimuliConfig for the readout classifier (None: no readout)
    batch_size: int = 256
    max_chars: int = 5000
    max_sentences: int = 50
    notes: list[str] = field(default_factory=list)
    _readout: dict | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ check

    def analyse(self, text: str) -> list[dict]:
        """Sentences with tokens, spans, unknown words and sites (no margins yet)."""
        out = []
        for sent in validate_text(text, self.max_chars, self.max_sentences):
            tokens = tokenize(sent)
            unk = [i for i, t in enumerate(tokens) if t not in self.vocab.stoi]
            out.append({"text": sent, "tokens": tokens, "spans": token_spans(sent), "unknown": unk,
                        "sites": find_sites(tokens, self.lexicon, self.vocab)})
        return out

    def _verdict(self, margin: float) -> tuple[str, float]:
        d = margin - self.threshold
        conf = 1.0 / (1.0 + math.exp(-min(60.0, self.scale * abs(d))))
        return ("error" if d < 0 else "ok"), conf

    def check_many(self, texts: list[str], activations: bool = False) -> list[dict]:
        """:meth:`check` of several texts with one batched LM pass over all their sentences."""
        analysed = [self.analyse(t) for t in texts]
        flat = [s for a in analysed for s in a]
        keys = [(i, s.position, self.vocab.stoi[s.word], self.vocab.stoi[s.alternate])
                for i, sent in enumerate(flat) for s in sent["sites"]]
        margins = site_margins(self.model, self.vocab, [s["tokens"] for s in flat], keys, self.batch_size).tolist()
        acts = self._activations([s["tokens"] for s in flat]) if activations else None
        results, k, j = [], 0, 0
        for a in analysed:
            sentences, n_err, unknown, gsite = [], 0, [], 0
            for si, sent in enumerate(a):
                spans = sent["spans"]
                sites = []
                for s in sent["sites"]:
                    m = margins[k]
                    k += 1
                    verdict, conf = self._verdict(m)
                    n_err += verdict == "error"
                    span = list(spans[s.position]) if spans else None
                    original = sent["text"][span[0]:span[1]] if span else s.word
                    site = {"site": gsite, "position": s.position, "word": s.word, "kind": s.kind,
                            "number": s.number, "alternate": s.alternate, "margin": round(m, 4),
                            "verdict": verdict, "confidence": round(conf, 4),
                            "suggestion": _match_case(s.alternate, original) if verdict == "error" else None,
                            "span": span, "context_unknown": sum(1 for u in sent["unknown"] if u < s.position)}
                    if s.controller is not None:
                        det = sent["tokens"][s.controller]
                        site["controller"] = s.controller
                        site["alternative"] = f"{DEMONSTRATIVES[det]} {s.word}"
                    sites.append(site)
                    gsite += 1
                entry = {"index": si, "text": sent["text"], "tokens": sent["tokens"],
                         "spans": [list(x) for x in spans] if spans else None,
                         "unknown": sent["unknown"], "sites": sites}
                if acts is not None:
                    entry["activations"] = acts[j]
                j += 1
                unknown += [sent["tokens"][u] for u in sent["unknown"]]
                sentences.append(entry)
            notes = []
            if unknown:
                notes.append(f"{len(unknown)} word(s) outside the vocabulary were read as <unk>: "
                             + ", ".join(dict.fromkeys(unknown)))
            if not self.calibrated:
                notes.append("the threshold is not calibrated (run `agreelens calibrate`); using "
                             f"{self.threshold:g}")
            results.append({"model": self.name, "threshold": round(self.threshold, 4), "sentences": sentences,
                            "n_sites": gsite, "n_errors": n_err, "unknown": list(dict.fromkeys(unknown)),
                            "notes": notes})
        return results

    def check(self, text: str, activations: bool = False) -> dict:
        """Per sentence: tokens, sites with margin, verdict, suggestion and confidence. ``activations``:
        also the number units' cell states per token (``{"units", "c", "h"}``)."""
        return self.check_many([text], activations)[0]

    # ------------------------------------------------------------------ units

    def _unit_index(self):
        from agreelens.trace import lstm_of, unit_to_layer_index

        rnn = lstm_of(self.model)
        units = [u for u in self.units if 1 <= u <= rnn.num_layers * rnn.hidden_size]
        return [(u, *unit_to_layer_index(u, rnn.hidden_size, rnn.num_layers)) for u in units]

    def _activations(self, sentences: list[list[str]]) -> list[dict]:
        """Per sentence, ``{"units": [...], "c": [[per token] per unit], "h": ...}``: the state after
        reading each token (exact tracing)."""
        from agreelens.trace import run

        try:
            idx = self._unit_index()
        except TypeError:  # not an LSTM model
            return [{"units": [], "c": [], "h": []} for _ in sentences]
        if not idx:
            return [{"units": [], "c": [], "h": []} for _ in sentences]
        layers = sorted({lay for _, lay, _ in idx})
        names = [f"L{lay}.{k}" for lay in layers for k in ("c", "h")]
        out: list[dict | None] = [None] * len(sentences)
        order = sorted(range(len(sentences)), key=lambda s: -len(sentences[s]))
        device = _device(self.model)
        with torch.inference_mode():
            for lo in range(0, len(order), self.batch_size):
                chunk = order[lo:lo + self.batch_size]
                seqs = [torch.tensor([self.vocab.eos, *self.vocab.encode(sentences[s])]) for s in chunk]
                ids = pad_sequence(seqs, padding_value=self.vocab.eos).to(device)
                _, cache, _ = run(self.model, ids, names=names)
                for b, s in enumerate(chunk):
                    n = len(sentences[s])
                    out[s] = {"units": [u for u, _, _ in idx],
                              **{k: [[round(float(x), 4) for x in cache[f"L{lay}.{k}"][1:n + 1, b, j]]
                                     for _, lay, j in idx] for k in ("c", "h")}}
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ explain

    def readout(self) -> dict | None:
        """The diagnostic classifier (fit once, cached): logistic regression of the subject's number
        (plural = 1) on layer-2 ``h`` at every word from the subject to the one before the verb, over NA
        stimuli generated from the vocabulary (``stimuli`` settings)."""
        if self._readout is None:
            self._readout = _fit_readout(self.model, self.vocab, self.stimuli) or {}
        return self._readout or None

    def explain(self, text: str, site: int | None = None) -> dict:
        """One site (index as in :meth:`check`; default the first error, else the first site): its
        sentence traced, the number units' i, f, o, c, h per step, the readout's P(plural subject) per
        step, and the site's margin with each number unit (and all together) ablated."""
        from agreelens.ablation import verb_margins
        from agreelens.trace import lstm_of, run, trace, unit_mask

        if site is not None and (isinstance(site, bool) or not isinstance(site, int)):
            raise InputError(f"site must be an integer, got {site!r}")
        checked = self.check(text)
        flat = [(sent, s) for sent in checked["sentences"] for s in sent["sites"]]
        if not flat:
            raise InputError("no agreement site found in the text", 422)
        if site is None:
            site = next((s["site"] for _, s in flat if s["verdict"] == "error"), 0)
        if not 0 <= site < len(flat):
            raise InputError(f"site {site} out of range: the text has {len(flat)} site(s), 0..{len(flat) - 1}", 422)
        sent, s = flat[site]
        tokens, pos = sent["tokens"], s["position"]
        rnn = lstm_of(self.model)
        hsz, layers = rnn.hidden_size, rnn.num_layers
        ids = torch.tensor([self.vocab.eos, *self.vocab.encode(tokens)], device=_device(self.model)).unsqueeze(1)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                tr = trace(self.model, ids)
        finally:
            self.model.train(was_training)
        idx = self._unit_index()
        steps = ["<eos>", *[t if t in self.vocab.stoi else f"{t} (<unk>)" for t in tokens]]
        units_out = [{"unit": u, "layer": lay, "index": j,
                      **{k: [round(float(x), 4) for x in getattr(tr, k)[lay - 1, :, 0, j]] for k in ("i", "f", "o", "c", "h")}}
                     for u, lay, j in idx]
        # ablation: the masks and code of `agreelens ablate` (verb_margins) on this site's prefix
        ablations = [[u] for u, _, _ in idx] + ([[u for u, _, _ in idx]] if len(idx) > 1 else [])
        masks = torch.stack([torch.ones(layers * hsz)] + [unit_mask(a, hsz, layers) for a in ablations])
        prefix = " ".join(tokens[:pos])
        pair = {"one_prefix_prefix": prefix, "one_prefix_word_good": s["word"], "one_prefix_word_bad": s["alternate"],
                "UID": "explain", "pairID": str(site)}
        if tokenize(prefix) == tokens[:pos]:
            margins, _ = verb_margins(self.model, self.vocab, [pair], masks)
            margins = margins[:, 0].tolist()
        else:  # the prefix does not survive re-tokenization: the same masks through trace.run
            good = torch.tensor([self.vocab.stoi[s["word"]]] * len(masks), device=ids.device)
            bad = torch.tensor([self.vocab.stoi[s["alternate"]]] * len(masks), device=ids.device)
            with torch.inference_mode():
                feats, _, _ = run(self.model, ids[: pos + 1].expand(-1, len(masks)), mask=masks.to(ids.device))
                margins = self.model.target_margin(feats[-1], good, bad).double().tolist()
        full = margins[0]
        abl = [{"units": a, "margin": round(m, 4), "delta": round(m - full, 4),
                "verdict": self._verdict(m)[0]} for a, m in zip(ablations, margins[1:])]
        for u, a in zip(units_out, abl):
            u["ablated_margin"], u["delta"] = a["margin"], a["delta"]
        ro = self.readout()
        readout = None
        if ro:
            h = tr.h[min(layers, 2) - 1, :, 0].float().cpu()
            p = torch.sigmoid(((h - ro["mean"]) / ro["std"]) @ ro["w"] + ro["b"])
            readout = {"state": ro["state"], "p_plural": [round(float(x), 4) for x in p],
                       "heldout_accuracy": ro["heldout_accuracy"], "n_train": ro["n_train"]}
        return {"model": self.name, "threshold": round(self.threshold, 4), "site": s,
                "sentence": {"index": sent["index"], "text": sent["text"], "tokens": tokens},
                "steps": steps, "predicting_step": pos,
                "margin": round(full, 4), "units": units_out, "ablations": abl, "readout": readout,
                "notes": [] if idx else ["no number units known for this model (metrics/units_<model>.json "
                                         "or analysis.units)"]}

    # ------------------------------------------------------------------ score

    def score(self, pairs, method: str = "auto", max_pairs: int = 5000) -> dict:
        """Minimal pairs (BLiMP-style dicts) -> ``scoring.score_pairs`` (accuracy, n, oov, groups)."""
        from agreelens.scoring import METHODS, score_pairs

        validate_pairs(pairs, max_pairs)
        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        try:
            return score_pairs(self.model, self.vocab, pairs, batch_size=self.batch_size, method=method)
        except ValueError as err:  # e.g. method 'prefix' on a pair without the one-prefix fields
            raise InputError(str(err), 422) from None


def validate_pairs(pairs, max_pairs: int = 5000) -> None:
    """The checks of ``scoring.read_pairs`` on in-memory pairs; :class:`InputError` names the pair."""
    from agreelens.scoring import PREFIX_FIELDS, REQUIRED_FIELDS

    if not isinstance(pairs, list):
        raise InputError(f"pairs must be a list of objects, got {type(pairs).__name__}")
    if not pairs:
        raise InputError("pairs is empty")
    if len(pairs) > max_pairs:
        raise InputError(f"{len(pairs):,} pairs; the limit is {max_pairs:,}", 413)
    for i, rec in enumerate(pairs):
        where = f"pairs[{i}]"
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected an object, got {type(rec).__name__}")
        missing = [f for f in REQUIRED_FIELDS if rec.get(f) is None]
        if missing:
            raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
        for f in ("sentence_good", "sentence_bad"):
            if not isinstance(rec[f], str):
                raise InputError(f"{where}: {f} must be a string")
            if _BAD_CONTROL.search(rec[f]):
                raise InputError(f"{where}: {f} contains a control character")
        present = [f for f in PREFIX_FIELDS if rec.get(f) is not None]
        if present and len(present) != len(PREFIX_FIELDS):
            raise InputError(f"{where}: has {', '.join(present)} but not the other one-prefix field(s)")
        for f in present:
            if not isinstance(rec[f], str):
                raise InputError(f"{where}: {f} must be a string")


def _fit_readout(model: nn.Module, vocab: Vocab, stim_cfg, steps: int = 100) -> dict | None:
    """Logistic regression of the subject's number on layer-2 h (see :meth:`Checker.readout`)."""
    from agreelens.stimuli import generate
    from agreelens.trace import lstm_of, trace

    if stim_cfg is None:
        return None
    try:
        layers = lstm_of(model).num_layers
        pairs, _ = generate(stim_cfg, vocab)
    except (ValueError, TypeError) as err:
        log.warning("no readout classifier: %s", err)
        return None
    if len({p["condition"][0] for p in pairs}) < 2:
        return None
    by_len: dict[int, list[dict]] = {}
    for p in pairs:
        by_len.setdefault(len(tokenize(p["sentence_good"])), []).append(p)
    xs, ys, held = [], [], []
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for group in by_len.values():
                ids = torch.tensor([[vocab.eos, *vocab.encode(tokenize(p["sentence_good"]))] for p in group],
                                   device=device).t()
                h = trace(model, ids).h[min(layers, 2) - 1].float().cpu()  # (T, B, H)
                for b, p in enumerate(group):
                    verb = len(tokenize(p["one_prefix_prefix"]))  # word index of the verb
                    for w in range(1, verb):  # subject .. the word before the verb (state after reading it)
                        xs.append(h[w + 1, b])
                        ys.append(float(p["condition"][0] == "P"))
                        held.append(zlib.crc32(str(p["pairID"]).encode()) % 5 == 0)
    finally:
        model.train(was_training)
    x = torch.stack(xs)
    y = torch.tensor(ys)
    held_t = torch.tensor(held)
    if held_t.all() or not held_t.any():
        held_t = torch.arange(len(ys)) % 5 == 0
    train = ~held_t
    mean, std = x[train].mean(0), x[train].std(0) + 1e-3
    z = (x - mean) / std
    w = torch.zeros(x.size(1), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z[train] @ w + b, y[train]) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        acc = float((((z[held_t] @ w + b) > 0).float() == y[held_t]).float().mean())
    return {"state": f"L{min(layers, 2)}.h", "mean": mean, "std": std, "w": w.detach(), "b": b.detach(),
            "heldout_accuracy": round(acc, 4), "n_train": int(train.sum())}


# ---------------------------------------------------------------------------------------- calibration


def _best_f1(margins: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    """Threshold maximising F1 of error detection (error: margin < threshold; label 1 = error)."""
    order = margins.argsort()
    m, y = margins[order], labels[order].double()
    tp = y.cumsum(0)  # predicting the first k+1 as errors
    k = torch.arange(1, len(m) + 1, dtype=torch.float64)
    positives = y.sum()
    f1 = 2 * tp / (k + positives)
    # thresholds only between distinct margins
    distinct = torch.ones(len(m), dtype=torch.bool)
    distinct[:-1] = m[1:] > m[:-1]
    f1 = torch.where(distinct, f1, torch.zeros_like(f1))
    best = int(f1.argmax())
    thr = float((m[best] + m[best + 1]) / 2) if best + 1 < len(m) else float(m[best]) + 1e-6
    return thr, _prf(margins, labels, thr)


def _prf(margins: torch.Tensor, labels: torch.Tensor, thr: float) -> dict:
    pred = margins < thr
    y = labels.bool()
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    acc = float((pred == y).double().mean()) if len(y) else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4), "accuracy": round(acc, 4),
            "n": int(len(y)), "errors": int(y.sum())}


def _fit_scale(margins: torch.Tensor, labels: torch.Tensor, thr: float) -> float:
    """Slope a of P(error) = sigmoid(a (threshold - margin)), by maximum likelihood over a grid."""
    d = (thr - margins).double()
    y = labels.double()
    best, best_ll = 1.0, -math.inf
    for a in torch.logspace(-2, 1.5, 141, dtype=torch.float64):
        z = a * d
        ll = float((y * nn.functional.logsigmoid(z) + (1 - y) * nn.functional.logsigmoid(-z)).sum())
        if ll > best_ll:
            best, best_ll = float(a), ll
    return best


def blimp_examples(lexicon: Lexicon, vocab: Vocab, pairs: list[dict]) -> tuple[list[list[str]], list[tuple], list[int], int]:
    """From BLiMP pairs (good and bad sentence of one length, one token apart): the site the checker
    finds at the differing token or up to two tokens after it (``The woman meet``: the verb after the
    changed subject) in both sentences. Returns ``(sentences, sites, labels, covered pairs)``; label 1
    = the bad sentence's site (an error)."""
    sents, sites, labels, covered = [], [], [], 0
    for p in pairs:
        good, bad = tokenize(p["sentence_good"]), tokenize(p["sentence_bad"])
        if len(good) != len(bad):
            continue
        diff = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
        if len(diff) != 1:
            continue
        d = diff[0]
        sg = {s.position: s for s in find_sites(good, lexicon, vocab)}
        sb = {s.position: s for s in find_sites(bad, lexicon, vocab)}
        pos = next((q for q in range(d, min(d + 3, len(good))) if q in sg and q in sb), None)
        if pos is None:
            continue
        covered += 1
        for toks, s, lab in ((good, sg[pos], 0), (bad, sb[pos], 1)):
            sites.append((len(sents), s.position, vocab.stoi[s.word], vocab.stoi[s.alternate]))
            sents.append(toks)
            labels.append(lab)
    return sents, sites, labels, covered


def calibrate(model: nn.Module, vocab: Vocab, lexicon: Lexicon, blimp_pairs: list[dict] = (),
              test_sentences: list[str] = (), max_sentences: int = 0, seed: int = 1,
              batch_size: int = 256) -> dict:
    """Threshold that maximises F1 of error detection on held-out examples.

    - BLiMP pairs (:func:`blimp_examples`): the good sentence's site is correct, the bad one's an error.
    - ``test_sentences`` (whitespace-tokenized lines, e.g. ``prepared/test.txt``; at most
      ``max_sentences``, 0 = all, seeded sample): one site per sentence drawn at random; unchanged it is
      correct (margin m), swapped to its alternate it is an error. The swap leaves the site's prefix
      as it was, so the swapped sentence's margin is exactly -m.

    Returns ``{"threshold", "precision", "recall", "f1", "accuracy", "n", "errors", "scale",
    "at_zero", "sources": {...}}``."""
    rng = random.Random(seed)
    b_sents, b_sites, b_labels, covered = blimp_examples(lexicon, vocab, list(blimp_pairs))
    b_m = site_margins(model, vocab, b_sents, b_sites, batch_size)
    lines = [ln.split() for ln in test_sentences if ln.strip()]
    if max_sentences and len(lines) > max_sentences:
        lines = rng.sample(lines, max_sentences)
    t_sents, t_sites = [], []
    n_with_sites = 0
    for toks in lines:
        found = find_sites(toks, lexicon, vocab)
        if not found:
            continue
        n_with_sites += 1
        s = rng.choice(found)
        t_sites.append((len(t_sents), s.position, vocab.stoi[s.word], vocab.stoi[s.alternate]))
        t_sents.append(toks)
    t_m = site_margins(model, vocab, t_sents, t_sites, batch_size)
    margins = torch.cat([b_m, t_m, -t_m])
    labels = torch.cat([torch.tensor(b_labels, dtype=torch.long), torch.zeros(len(t_m), dtype=torch.long),
                        torch.ones(len(t_m), dtype=torch.long)])
    if len(margins) < 2 or labels.sum() == 0:
        raise ValueError("no calibration examples: no BLiMP pair or test sentence has an agreement site")
    thr, best = _best_f1(margins, labels)
    t_all = torch.cat([t_m, -t_m])
    t_lab = torch.cat([torch.zeros(len(t_m), dtype=torch.long), torch.ones(len(t_m), dtype=torch.long)])
    kinds = Counter()
    for toks, (s, pos, g, _) in zip(t_sents, t_sites):
        kinds[next(x.kind for x in find_sites(toks, lexicon, vocab) if x.position == pos)] += 1
    return {
        "threshold": round(thr, 4), **best,
        "scale": round(_fit_scale(margins, labels, thr), 4),
        "at_zero": _prf(margins, labels, 0.0),
        "sources": {
            "blimp": {"pairs": len(blimp_pairs), "covered": covered,
                      **(_prf(b_m, torch.tensor(b_labels), thr) if b_labels else {"n": 0})},
            "test": {"sentences": len(lines), "with_sites": n_with_sites, "site_kinds": dict(kinds),
                     **(_prf(t_all, t_lab, thr) if len(t_m) else {"n": 0})},
        },
    }


# ---------------------------------------------------------------------------------------- loading


def model_tag(spec: str, model_dir: Path | None = None, prefix: str = "agreelens") -> str:
    """``large`` for ``models:/agreelens-large@champion``, ``models/large`` or a model whose config
    says ``"name": "large"``."""
    if model_dir is not None:
        try:
            meta = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
            if isinstance(meta.get("name"), str) and meta["name"]:
                return meta["name"]
        except (OSError, ValueError):
            pass
    spec = str(spec)
    if spec.startswith("models:/"):
        name = re.split(r"[@/]", spec[len("models:/"):])[0]
        return name[len(prefix) + 1:] if name.startswith(prefix + "-") else name
    return Path(spec).name


def _shipped(model_dir: Path, kind: str, tag: str, root: Path) -> Path | None:
    """``<kind>*.json`` shipped with the model (in its directory or, for a registry model, anywhere in the
    artifact download it came in: `agreelens register` logs them), else ``<root>/metrics/<kind>_<tag>.json``."""
    model_dir = Path(model_dir)
    found = sorted(model_dir.glob(f"{kind}*.json"))
    download = next((d for d in model_dir.parents if d.name.startswith("agreelens-registry-")), None)
    if not found and download is not None:
        found = sorted(download.rglob(f"{kind}*.json"))
    if found:
        return found[0]
    p = Path(root) / "metrics" / f"{kind}_{tag}.json"
    return p if p.is_file() else None


def find_calibration(model_dir: Path, tag: str, root: Path) -> Path | None:
    """The checker's calibration for the model (see :func:`_shipped`)."""
    return _shipped(model_dir, "calibration", tag, root)


def load_units(tag: str, root: Path, params=None, model_dir: Path | None = None) -> list[int]:
    """Number units found by the sweep (shipped with a registered model, else ``metrics/units_<tag>.json``),
    else ``analysis.units`` of the settings."""
    p = _shipped(model_dir, "units", tag, root) if model_dir is not None else Path(root) / "metrics" / f"units_{tag}.json"
    if p is not None and p.is_file():
        try:
            return [int(u["unit"]) for u in json.loads(p.read_text())["number_units"]]
        except (ValueError, KeyError, TypeError):
            log.warning("%s: no number_units list; using analysis.units", p)
    return list(params.analysis.units) if params is not None else []


def load_checker(spec: str, params=None, root: str | Path = ".", fallback: str | None = None,
                 threshold: float | None = None) -> Checker:
    """A :class:`Checker` for model ``spec`` (``large``, a model directory or ``models:/name@alias``).
    Where ``spec`` cannot be loaded and ``fallback`` is given, the fallback model is loaded instead
    (logged). Threshold, scale and lexicon come from the calibration file (:func:`find_calibration`);
    without one the threshold is 0 and the lexicon is built from ``prepared/train_*.txt`` (else from the
    vocabulary's morphology)."""
    from agreelens.model import default_device, load_model
    from agreelens.na import resolve_model

    root = Path(root)
    notes = []
    try:
        model_dir = _resolve(spec, root, resolve_model)
        used = spec
    except Exception as err:  # noqa: BLE001 - registry down, no such alias, missing directory: fall back
        if not fallback or fallback == spec:
            raise
        log.warning("model %s could not be loaded (%s: %s); falling back to %s", spec, type(err).__name__, err, fallback)
        notes.append(f"{spec} unavailable ({type(err).__name__}); using {fallback}")
        model_dir = _resolve(fallback, root, resolve_model)
        used = fallback
    model, vocab = load_model(model_dir, default_device())
    prefix = params.registry.prefix if params is not None else "agreelens"
    tag = model_tag(used, model_dir, prefix)
    log.info("agreelens checker: model %s (%s) from %s", used, tag, model_dir)
    cal_path = find_calibration(model_dir, tag, root)
    cal = json.loads(cal_path.read_text()) if cal_path else {}
    if cal.get("lexicon", {}).get("verbs") is not None:
        lex = Lexicon.from_vocab(vocab, [tuple(v) for v in cal["lexicon"]["verbs"]], cal["lexicon"].get("source", ""))
    else:
        out = Path(root) / (params.prepare.out if params is not None else "prepared")
        lex = build_lexicon(vocab, sorted(out.glob("train_*.txt")), model)
    if not cal_path:
        log.warning("no calibration for %s (metrics/calibration_%s.json); threshold 0", tag, tag)
    svc = getattr(params, "service", None)
    return Checker(model, vocab, lex, threshold=float(threshold if threshold is not None else cal.get("threshold", 0.0)),
                   scale=float(cal.get("scale", 1.0)), name=tag, calibrated=bool(cal_path),
                   units=load_units(tag, root, params, model_dir), stimuli=_readout_stimuli(params),
                   max_chars=getattr(svc, "max_chars", 5000), max_sentences=getattr(svc, "max_sentences", 50),
                   notes=notes)


def _resolve(spec: str, root: Path, resolve_model) -> Path:
    if not str(spec).startswith("models:/"):
        for cand in (Path(spec), root / spec, root / "models" / str(spec)):
            if (cand / "model.safetensors").is_file():
                return cand
    return resolve_model(spec)


def _readout_stimuli(params):
    if params is None:
        return None
    n = getattr(getattr(params, "service", None), "readout_per_condition", 30)
    return params.stimuli.model_copy(update={"n_per_condition": n, "min_count": 0})


def run_calibrate(params, name: str, root: str | Path = ".", out: str | Path | None = None) -> dict:
    """``agreelens calibrate``: calibrate model ``name`` on ``data/blimp`` and ``prepared/test.txt``;
    writes ``metrics/calibration_<name>.json`` (with the verb lexicon the checker uses)."""
    import os

    from agreelens.files import write_text
    from agreelens.model import default_device, load_model
    from agreelens.na import resolve_model
    from agreelens.scoring import read_pairs

    root = Path(root)
    torch.set_num_threads(params.train.threads or os.cpu_count() or 1)
    model_dir = _resolve(name, root, resolve_model)
    model, vocab = load_model(model_dir, default_device())
    tag = model_tag(name, model_dir, params.registry.prefix)
    prepared = root / params.prepare.out
    lex = build_lexicon(vocab, sorted(prepared.glob("train_*.txt")), model)
    blimp_dir = root / params.data.root / "blimp"
    blimp = read_pairs(sorted(blimp_dir.glob("*.jsonl"))) if blimp_dir.is_dir() else []
    test = prepared / "test.txt"
    lines = test.read_text(encoding="utf-8").splitlines() if test.is_file() else []
    if not blimp and not lines:
        raise FileNotFoundError(f"no calibration data: neither {blimp_dir}/*.jsonl nor {test}; run `dvc repro`")
    svc = params.service
    result = {"model": tag, **calibrate(model, vocab, lex, blimp, lines, svc.calibration_sentences,
                                        svc.calibration_seed)}
    result["lexicon"] = lex.to_dict()
    out = Path(out or root / "metrics" / f"calibration_{tag}.json")
    body = json.dumps({k: v for k, v in result.items() if k != "lexicon"}, indent=1)
    write_text(out, body[:-2] + ',\n "lexicon": ' + json.dumps(result["lexicon"]) + "\n}\n")  # the list on one line
    return result
