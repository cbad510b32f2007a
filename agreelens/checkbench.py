"""The agreement checker's benchmark: correct sentences of held-out text and the same sentences with one
agreement site swapped, split into dev and test by document.

Stage ``checkbench`` (``agreelens checkbench``) writes ``<out>/dev.jsonl`` and ``<out>/test.jsonl``, one
record per sentence of the natural-text benchmark's documents (:mod:`agreelens.natural`: the corpora's test
split and WikiText-2's valid/test, never trained on; each document in the split the natural benchmark gave
it; every sentence with a parser-verified agreement site, plus a seeded sample of the others up to
``max_per_source`` per source)::

    {"text", "source", "doc", "errors": [{"position", "word", "alternate", "kind", "n_attractors"}]}

An *error* is the sentence with the word at ``position`` (a token of :func:`agreelens.text.tokenize`)
replaced by ``alternate``. The sites swapped: every verb of the natural benchmark (its subject found by the
parser, with its attractor count; kind ``verb`` or ``aux``), is/are/was/were after a sentence-initial
existential *there* (kind ``there``) and a noun after this/these/those (kind ``noun``, its number
alternate from the vocabulary's morphology).

:func:`examples` reads the records for a checker: the sites it finds in each correct sentence and the site
it finds at each swapped position, with their evidence (:func:`agreelens.verdicts.site_evidence`);
:func:`figures` turns verdicts into *false alarms per 100 correct sentences* and *errors caught per 100
errors*, by source, site kind and attractor count.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import torch
from agreelens.files import write_text
from agreelens.lexicon import morph_pairs
from agreelens.text import tokenize

BUCKETS = ("0", "1", "2+")
THERE_VERBS = {"is": "are", "are": "is", "was": "were", "were": "was"}


def attractor_bucket(n) -> str:
    return "-" if n is None else (str(n) if n < 2 else "2+")


def _extra_errors(tokens: list[str], nouns: dict[str, str]) -> list[dict]:
    out = []
    for i, w in enumerate(tokens):
        prev = tokens[i - 1] if i else ""
        if w in THERE_VERBS and prev == "there" and i == 1:
            out.append({"position": i, "word": w, "alternate": THERE_VERBS[w], "kind": "there", "n_attractors": None})
        elif prev in ("this", "these", "those") and w in nouns:
            out.append({"position": i, "word": w, "alternate": nouns[w], "kind": "noun", "n_attractors": None})
    return out


def build(params, progress: bool = True) -> dict:
    """Write ``<out>/{dev,test}.jsonl`` (see the module docstring) and return the counts."""
    from agreelens.natural import dev_or_test, heldout_documents

    cfg, nat = params.checkbench, params.natural
    root, out = Path(params.data.root), Path(cfg.out)
    items: dict[tuple, list[dict]] = defaultdict(list)
    for split in ("dev", "test"):
        path = Path(nat.out) / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no natural-text benchmark; run `agreelens natural` (or `dvc repro`)")
        for line in path.read_text(encoding="utf-8").splitlines():
            it = json.loads(line)
            items[it["source"], it["doc"], it["sentence_good"]].append(it)
    vocab_words = Path(params.prepare.out, "vocab.txt").read_text(encoding="utf-8").split()
    nouns = {}
    for s, p in morph_pairs(set(vocab_words)):
        nouns.setdefault(s, p)
        nouns.setdefault(p, s)
    train = set()
    for f in sorted(Path(params.prepare.out).glob("train_*.txt")):
        train.update(f.read_text(encoding="utf-8").splitlines())
    rng = random.Random(f"agreelens-checkbench/{cfg.seed}")
    records: dict[str, list[dict]] = {"dev": [], "test": []}
    pool: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for source, doc, sents in heldout_documents(root, params.prepare, nat.sources):
        split = dev_or_test(source, doc, nat.seed, nat.dev_frac)
        for text in sents:
            toks = tokenize(text)
            if not 2 <= len(toks) <= nat.max_tokens or " ".join(toks) in train:
                continue
            errors = []
            for it in items.get((source, doc, text), []):
                pos = len(tokenize(it["one_prefix_prefix"]))
                if pos < len(toks) and toks[pos] == it["one_prefix_word_good"].lower():
                    errors.append({"position": pos, "word": toks[pos], "alternate": it["one_prefix_word_bad"].lower(),
                                   "kind": it["kind"], "n_attractors": it["n_attractors"]})
            taken = {e["position"] for e in errors}
            errors += [e for e in _extra_errors(toks, nouns) if e["position"] not in taken]
            rec = {"text": text, "source": source, "doc": doc, "errors": sorted(errors, key=lambda e: e["position"])}
            (records[split] if any(e["kind"] in ("verb", "aux") for e in errors) else pool[split, source]).append(rec)
    counts = {}
    for split in ("dev", "test"):
        per_source = Counter(r["source"] for r in records[split])
        for source in nat.sources:
            rest = pool[split, source]
            room = max(0, cfg.max_per_source - per_source[source]) if cfg.max_per_source else len(rest)
            records[split] += rng.sample(rest, min(room, len(rest)))
        recs = sorted(records[split], key=lambda r: (r["source"], r["doc"], r["text"]))
        write_text(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        errs = [e for r in recs for e in r["errors"]]
        counts[split] = {"sentences": len(recs), "errors": len(errs),
                         "by_source": dict(Counter(r["source"] for r in recs)),
                         "errors_by_kind": dict(Counter(e["kind"] for e in errs)),
                         "errors_by_attractors": dict(Counter(attractor_bucket(e["n_attractors"]) for e in errs))}
    write_text(Path("metrics/checkbench.json"), json.dumps(counts, indent=2) + "\n")
    return counts


def read(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checker benchmark; run `agreelens checkbench` (or `dvc repro`)")
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------- evaluation


def examples(checker, records: list[dict], nlp=None, processes: int = 1) -> dict:
    """Evidence of every site the checker finds in the correct sentences (``ok``) and of the site it finds
    at each swapped position (``err``; an error whose position holds no site is missed whatever the
    threshold). One :func:`site_evidence` call over both; with ``nlp`` (spaCy), also the parse rule's
    verdict at every site (``rule``: 1 error, 0 correct, None), parsed in ``processes`` processes."""
    from agreelens.verdicts import site_evidence

    sents, sites, ok_meta, err_meta = [], [], [], []
    for r_i, rec in enumerate(records):
        toks = tokenize(rec["text"])
        gold = {e["position"]: e for e in rec["errors"]}
        found = checker.sites(toks)
        s_i = len(sents)
        sents.append(toks)
        for s in found:
            sites.append((s_i, s))
            g = gold.get(s.position)
            ok_meta.append({"record": r_i, "kind": s.kind, "site": s, "gold": g})
    n_ok = len(sites)
    missed = []
    for r_i, rec in enumerate(records):
        toks = tokenize(rec["text"])
        for e in rec["errors"]:
            bad = toks[:e["position"]] + [e["alternate"]] + toks[e["position"] + 1:]
            at = [s for s in checker.sites(bad) if s.position == e["position"]]
            if not at:
                missed.append({"record": r_i, **e})
                continue
            sites.append((len(sents), at[0]))
            sents.append(bad)
            err_meta.append({"record": r_i, "site": at[0], **e})
    margin, readout = site_evidence(checker.model, checker.vocab, sents, sites, checker.readout_for_verdicts(),
                                    checker.batch_size)
    rule: list = [None] * len(sites)
    if nlp is not None:
        from agreelens.parserule import cased_words, rule_verdicts
        from agreelens.sites import _match_case

        texts = [r["text"] for r in records] + [records[m["record"]]["text"] for m in err_meta]
        jobs: dict[int, tuple[list[str], list]] = {}
        for k, (s_i, site) in enumerate(sites):
            if s_i not in jobs:
                words = cased_words(texts[s_i], tokenize(texts[s_i]))
                if s_i >= len(records):  # a swapped sentence: the alternate in the written word's casing
                    m = err_meta[s_i - len(records)]
                    words[m["position"]] = _match_case(m["alternate"], words[m["position"]])
                jobs[s_i] = (words, [])
            jobs[s_i][1].append((site.position, site.kind, k))
        order = list(jobs)
        verdicts = rule_verdicts(nlp, [(jobs[i][0], [(p, kd) for p, kd, _ in jobs[i][1]]) for i in order], processes)
        for i, vs in zip(order, verdicts):
            for (_, _, k), v in zip(jobs[i][1], vs):
                rule[k] = v
    return {"n_sentences": len(records), "records": records,
            "ok": {"margin": margin[:n_ok], "readout": readout[:n_ok], "meta": ok_meta, "rule": rule[:n_ok],
                   "sentence": torch.tensor([m["record"] for m in ok_meta], dtype=torch.long)},
            "err": {"margin": margin[n_ok:], "readout": readout[n_ok:], "meta": err_meta, "rule": rule[n_ok:]},
            "missed": missed, "n_errors": len(err_meta) + len(missed)}


def scores(op, part: dict) -> torch.Tensor:
    """Error scores of ``part``'s sites at operating point ``op``; a site whose subject pattern decides is
    +/-1e6 (an error iff the written number differs from the subject's)."""
    s = op.scores(part["margin"], part["readout"], [m["site"].kind for m in part["meta"]])
    for k, m in enumerate(part["meta"]):
        site = m["site"]
        if site.subject_number is not None:
            s[k] = 1e6 if site.number != site.subject_number else -1e6
    return s


def verdict_codes(op, part: dict) -> torch.Tensor:
    """Per site: 2 error, 1 unsure, 0 ok at ``op`` (the parse rule's verdicts in ``part["rule"]`` decide the
    sites it is asked about, where ``op`` asks; where it has none, the LM's error is unsure up to
    ``op.alone_at``)."""
    s = scores(op, part)
    codes = torch.where(s > op.error_at, 2, torch.where(s > (op.unsure_at if op.unsure_at is not None
                                                                      else op.error_at), 1, 0))
    if op.ask_at is not None:
        for k, v in enumerate(part.get("rule") or []):
            x = float(s[k])
            if abs(x) >= 1e5 or x <= op.ask_at:
                continue
            if v in (0, 1):
                codes[k] = 2 if v else 0
            elif op.alone_at is not None and codes[k] == 2 and x <= op.alone_at:
                codes[k] = 1
    return codes


def figures(op, ex: dict) -> dict:
    """:func:`figures_of` the verdicts at operating point ``op``, and the correct sentences the parse rule is
    run on (``parsed_per_100``) where ``op`` asks it."""
    c_ok, c_err = verdict_codes(op, ex["ok"]), verdict_codes(op, ex["err"])
    out = figures_of(ex, c_ok == 2, c_ok >= 1, c_err == 2)
    if op.ask_at is not None:
        from agreelens.verdicts import rates

        asked = scores(op, ex["ok"]) > op.ask_at
        out["all"]["parsed_per_100"] = round(rates(asked, ex["ok"]["sentence"], len(ex["records"])), 2)
    return out


def figures_of(ex: dict, flag_ok: torch.Tensor, unsure_ok: torch.Tensor, caught: torch.Tensor) -> dict:
    """False alarms per 100 correct sentences and errors caught per 100 errors, for any verdicts: ``flag_ok``
    (error) and ``unsure_ok`` (unsure or error) per site of the correct sentences, ``caught`` per swapped
    error with a site (``ex["missed"]`` count as not caught). By source, by site kind (false alarms:
    sentences flagged at a site of that kind) and by attractor count (false alarms: parser-verified sites of
    that count flagged in the correct sentence, per 100 such sites)."""
    records = ex["records"]
    flag_ok, unsure_ok, caught = (torch.as_tensor(x, dtype=torch.bool) for x in (flag_ok, unsure_ok, caught))
    flagged_sent = torch.zeros(len(records), dtype=torch.bool)
    flagged_sent[ex["ok"]["sentence"][flag_ok]] = True
    unsure_sent = torch.zeros(len(records), dtype=torch.bool)
    unsure_sent[ex["ok"]["sentence"][unsure_ok & ~flag_ok]] = True
    per100 = lambda a, b: round(100.0 * a / b, 2) if b else None  # noqa: E731

    def part(sel_rec=lambda r: True, sel_err=lambda e: True) -> dict:
        recs = [i for i, r in enumerate(records) if sel_rec(r)]
        errs = [(bool(c), m) for c, m in zip(caught.tolist(), ex["err"]["meta"]) if sel_err(m)]
        errs += [(False, m) for m in ex["missed"] if sel_err(m)]
        return {"sentences": len(recs), "false_alarms_per_100": per100(int(flagged_sent[recs].sum()), len(recs)),
                "unsure_per_100": per100(int(unsure_sent[recs].sum()), len(recs)),
                "errors": len(errs), "caught_per_100": per100(sum(c for c, _ in errs), len(errs))}

    out = {"all": part(), "by_source": {}, "by_kind": {}, "by_attractors": {}}
    for src in sorted({r["source"] for r in records}):
        out["by_source"][src] = part(lambda r, s=src: r["source"] == s,
                                     lambda e, s=src: records[e["record"]]["source"] == s)
    kinds = sorted({m["kind"] for m in ex["err"]["meta"]} | {m["kind"] for m in ex["missed"]}
                   | {m["kind"] for m in ex["ok"]["meta"]})
    for kind in kinds:
        sel = [k for k, m in enumerate(ex["ok"]["meta"]) if m["kind"] == kind]
        hit = torch.zeros(len(records), dtype=torch.bool)
        if sel:
            idx = torch.tensor(sel)
            hit[ex["ok"]["sentence"][idx][flag_ok[idx]]] = True
        errs = part(sel_err=lambda e, k=kind: e["kind"] == k)
        out["by_kind"][kind] = {"sites": len(sel), "false_alarms_per_100": per100(int(hit.sum()), len(records)),
                                "errors": errs["errors"], "caught_per_100": errs["caught_per_100"]}
    for b in BUCKETS:
        gold_ok = [k for k, m in enumerate(ex["ok"]["meta"]) if m["gold"] is not None
                   and m["gold"]["kind"] in ("verb", "aux") and attractor_bucket(m["gold"]["n_attractors"]) == b]
        errs = part(sel_err=lambda e, b=b: e["kind"] in ("verb", "aux") and attractor_bucket(e["n_attractors"]) == b)
        out["by_attractors"][b] = {"sites": len(gold_ok),
                                   "false_alarms_per_100": per100(int(flag_ok[gold_ok].sum()) if gold_ok else 0,
                                                                  len(gold_ok)),
                                   "errors": errs["errors"], "caught_per_100": errs["caught_per_100"]}
    n_pairs = len(ex["err"]["meta"]) + len(ex["missed"])
    # F1 of error detection over the benchmark's parser-verified sites, each judged as written and swapped
    gold_ok = [k for k, m in enumerate(ex["ok"]["meta"]) if m["gold"] is not None]
    fp = int(flag_ok[gold_ok].sum()) if gold_ok else 0
    tp = int(caught.sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / n_pairs if n_pairs else 0.0
    out["sites_f1"] = {"precision": round(p, 4), "recall": round(r, 4),
                       "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}
    return out
