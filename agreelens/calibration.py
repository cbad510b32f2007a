"""Calibration of the agreement checker: the operating point chosen on the checker benchmark's dev set,
measured on its test set and on BLiMP's agreement pairs (``agreelens calibrate``, stage ``calibrate``).

:func:`run_calibrate` fits the subject-number readout on the NA task's dev pairs, scores every site of the
dev benchmark (:func:`agreelens.checkbench.examples`), chooses the evidence and thresholds for the
false-alarm budget (:func:`agreelens.verdicts.choose_operating_point`) and, where spaCy is installed, how
far the parse rule is asked (:func:`_choose_ask`); then it writes ``metrics/calibration_<model>.json``:
the operating point (and the LM-only one a service without spaCy falls back to), their figures on the test
set and BLiMP, the readout and the verb lexicon.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from agreelens.checker import Checker, _resolve, build_lexicon, model_tag
from agreelens.sites import Lexicon, find_sites
from agreelens.text import tokenize
from agreelens.verdicts import OperatingPoint, fit_readout, site_evidence
from agreelens.vocab import Vocab

log = logging.getLogger("agreelens.calibration")


def _prf(margins: torch.Tensor, labels: torch.Tensor, thr: float) -> dict:
    """Precision, recall, F1 and accuracy of error detection (error: margin < thr; label 1 = error)."""
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


def blimp_examples(lexicon: Lexicon, vocab: Vocab, pairs: list[dict]) -> tuple[list[list[str]], list[tuple], list[int], int]:
    """From BLiMP pairs (good and bad sentence of one length, one token apart): the site the checker
    finds at the differing token or up to two tokens after it (``The woman meet``: the verb after the
    changed subject) in both sentences. Returns ``(sentences, sites, labels, covered pairs)`` with sites
    ``(sentence index, Site)``; label 1 = the bad sentence's site (an error)."""
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
            sites.append((len(sents), s))
            sents.append(toks)
            labels.append(lab)
    return sents, sites, labels, covered


def blimp_figures(checker: "Checker", pairs: list[dict]) -> dict:
    """Error detection on BLiMP pairs at the checker's operating point (unsure counts as not flagged; the
    parse rule decides where the operating point asks it and the checker has a parser)."""
    from agreelens.checkbench import verdict_codes

    sents, sites, labels, covered = blimp_examples(checker.lexicon, checker.vocab, pairs)
    if not sites:
        return {"pairs": len(pairs), "covered": 0}
    m, r = site_evidence(checker.model, checker.vocab, sents, sites, checker.readout_for_verdicts(), checker.batch_size)
    texts = [p[f] for p in pairs for f in ("sentence_good", "sentence_bad")
             if len(tokenize(p["sentence_good"])) == len(tokenize(p["sentence_bad"]))]
    by_tokens = {tuple(tokenize(t)): t for t in texts}
    flat = [{"text": by_tokens.get(tuple(t), " ".join(t)), "tokens": t} for t in sents]
    part = {"margin": m, "readout": r, "meta": [{"site": x} for _, x in sites]}
    part["rule"] = checker._rule_verdicts(flat, sites, m.tolist(), r.tolist())
    flagged = verdict_codes(checker.op, part) == 2
    y = torch.tensor(labels)
    both = [bool(not flagged[2 * i] and flagged[2 * i + 1]) for i in range(covered)]
    return {"pairs": len(pairs), "covered": covered, **_prf(-flagged.double(), y, -0.5),
            "pairs_both_right": round(sum(both) / covered, 4)}


ASK_LEVELS = (5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 100)  # false-alarm levels of the LM's own scores, per 100
ALONE_LEVELS = (0.5, 1.0, 1.5, 2.0, 3.0)


def _choose_ask(op: OperatingPoint, dev: dict, budget: float, parse_budget: float,
                slack: float = 0.25) -> tuple[OperatingPoint | None, dict]:
    """The parse rule asked about every site scoring above ``ask_at``, one candidate per false-alarm level
    of the LM's own scores (:data:`ASK_LEVELS` per 100 correct sentences), each with the LM's error standing
    where the rule has no verdict everywhere above the error threshold or only above ``alone_at`` (the LM's
    score at :data:`ALONE_LEVELS`): of those within ``budget`` false alarms and ``parse_budget`` parsed
    sentences per 100 on dev, the one that parses the fewest sentences while catching within ``slack`` per
    100 of the most. Returns the point (None: none within budget) and its dev row with every candidate's
    figures."""
    from agreelens import checkbench
    from agreelens.verdicts import threshold_for_budget

    s_ok = checkbench.scores(op, dev["ok"])
    free = s_ok.abs() < 1e5
    at = lambda level: threshold_for_budget(s_ok[free], dev["ok"]["sentence"][free], dev["n_sentences"], level)  # noqa: E731
    alones = [(None, None)] + [(lv, at(lv)) for lv in ALONE_LEVELS]
    levels = []
    for level in ASK_LEVELS:
        ask = at(level)
        for alone_level, alone in alones:
            if alone is not None and alone <= op.error_at:
                continue  # no stricter than the error threshold itself
            cand = OperatingPoint(op.evidence + "+parser", op.weights, op.error_at, op.unsure_at, {}, ask, alone)
            f = checkbench.figures(cand, dev)["all"]
            levels.append((cand, {"level": level, "ask_at": round(ask, 4), "alone_level": alone_level,
                                  "alone_at": None if alone is None else round(alone, 4), **{k: f[k] for k in (
                                      "false_alarms_per_100", "caught_per_100", "parsed_per_100")}}))
    ok = [(c, r) for c, r in levels if r["false_alarms_per_100"] <= budget and r["parsed_per_100"] <= parse_budget]
    if not ok:
        return None, {"false_alarms_per_100": None, "caught_per_100": 0.0, "levels": [r for _, r in levels]}
    top = max(r["caught_per_100"] for _, r in ok)
    best, row = min(((c, r) for c, r in ok if r["caught_per_100"] >= top - slack),
                    key=lambda cr: (cr[1]["parsed_per_100"], -cr[1]["caught_per_100"]))
    return best, {**row, "levels": [r for _, r in levels]}


def run_calibrate(params, name: str, root: str | Path = ".", out: str | Path | None = None) -> dict:
    """``agreelens calibrate``: choose the checker's evidence and operating point for model ``name`` on the
    checker benchmark's dev set (false alarms per 100 correct sentences at most
    ``service.false_alarm_budget``; ``unsure`` up to ``service.unsure_budget``), measure it on the test set
    and BLiMP's agreement pairs, and write ``metrics/calibration_<name>.json`` with the lexicon and readout
    the checker uses."""
    import os

    from agreelens import checkbench
    from agreelens.files import write_text
    from agreelens.model import default_device, load_model
    from agreelens.na import resolve_model
    from agreelens.scoring import read_pairs
    from agreelens.verdicts import choose_operating_point

    root = Path(root)
    torch.set_num_threads(params.train.threads or os.cpu_count() or 1)
    model_dir = _resolve(name, root, resolve_model)
    model, vocab = load_model(model_dir, default_device())
    tag = model_tag(name, model_dir, params.registry.prefix)
    lex = build_lexicon(vocab, sorted((root / params.prepare.out).glob("train_*.txt")), model)
    dev_stimuli = root / params.train.na_stimuli
    stim = read_pairs(sorted(dev_stimuli.glob("*.jsonl"))) if dev_stimuli.is_dir() else []
    readout = fit_readout(model, vocab, stim) if stim else None
    checker = Checker(model, vocab, lex, name=tag, readout_model=readout)
    bench = root / params.checkbench.out
    svc = params.service
    nlp = None
    if svc.parser:
        from agreelens.parserule import load as load_parser

        nlp = load_parser()
        if nlp is None:
            log.warning("spaCy's en_core_web_sm is not installed: no parse-rule operating point")
    cores = params.train.threads or os.cpu_count() or 1  # the parser's processes, once the LM is done
    dev = checkbench.examples(checker, checkbench.read(bench / "dev.jsonl"), nlp, cores)
    ok = {"margin": dev["ok"]["margin"], "readout": dev["ok"]["readout"],
          "kind": [m["site"].kind for m in dev["ok"]["meta"]]}
    fixed = torch.tensor([math.nan if m["site"].subject_number is None else
                          (math.inf if m["site"].number != m["site"].subject_number else -math.inf)
                          for m in dev["ok"]["meta"]], dtype=torch.float64)
    keep = torch.tensor([m["site"].subject_number is None for m in dev["err"]["meta"]], dtype=torch.bool)
    err = {"margin": dev["err"]["margin"][keep], "readout": dev["err"]["readout"][keep],
           "kind": [m["site"].kind for m, k in zip(dev["err"]["meta"], keep.tolist()) if k]}
    evidences = ("margin", "margin+readout") if readout is not None else ("margin",)
    op_lm, candidates = choose_operating_point(ok, err, dev["ok"]["sentence"], dev["n_sentences"], dev["n_errors"],
                                               svc.false_alarm_budget, svc.unsure_budget, evidences, fixed)
    op = op_lm
    if nlp is not None:
        op_rule, candidates[f"{op_lm.evidence}+parser"] = _choose_ask(op_lm, dev, svc.false_alarm_budget, svc.parse_budget,
                                                                      svc.parse_slack)
        if op_rule is not None and candidates[f"{op_lm.evidence}+parser"]["caught_per_100"] > \
                candidates[op_lm.evidence]["caught_per_100"]:
            op = op_rule
    test_ex = checkbench.examples(checker, checkbench.read(bench / "test.jsonl"), nlp if op.ask_at is not None else None,
                                  cores)
    blimp_dir = root / params.data.root / "blimp"
    blimp_pairs = read_pairs(sorted(blimp_dir.glob("*.jsonl"))) if blimp_dir.is_dir() else []
    result = {"model": tag, "threshold": op.margin_threshold(), "false_alarm_budget": svc.false_alarm_budget,
              "unsure_budget": svc.unsure_budget}
    for key, point in (("", op), ("_lm", op_lm)):
        if key and point is op:
            continue
        checker.op, checker.parser = point, nlp if point.ask_at is not None else None
        fig = checkbench.figures(point, test_ex)
        point.expected = {"set": f"{params.checkbench.out}/test.jsonl",
                          **{k: fig["all"].get(k) for k in ("false_alarms_per_100", "caught_per_100",
                                                             "unsure_per_100", "parsed_per_100") if k in fig["all"]}}
        result[f"operating_point{key}"] = point.to_dict()
        result[f"test{key}"] = fig
        result[f"blimp{key}"] = blimp_figures(checker, blimp_pairs) if blimp_pairs else {}
    checker.op, checker.parser = op, nlp if op.ask_at is not None else None
    result["dev"] = {"candidates": candidates, **checkbench.figures(op, dev)}
    result["readout"] = readout.to_dict() if readout is not None else None
    result["lexicon"] = lex.to_dict()
    out = Path(out or root / "metrics" / f"calibration_{tag}.json")
    body = json.dumps({k: v for k, v in result.items() if k not in ("lexicon", "readout")}, indent=1)
    tail = ',\n "readout": ' + json.dumps(result["readout"]) + ',\n "lexicon": ' + json.dumps(result["lexicon"])
    write_text(out, body[:-2] + tail + "\n}\n")  # the long lists on one line each
    return result
