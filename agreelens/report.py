"""``reports/report.md``: the study in one page, built by ``dvc repro`` (stage ``report``) from the
pipeline's metrics and figures: Table 6, the number units found by the sweep, Table 7 for them, the
paper's Figures 2-3 for our units, gate saturation, probing classifiers, and the paper's figures beside
ours."""

from __future__ import annotations

import json
from pathlib import Path

from agreelens.ablation import table7_rows
from agreelens.na import PAPER_TABLE6, table6
from agreelens.probe import verb_decoding

PAPER_UNITS = "776 (singular) and 988 (plural)"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `dvc repro` to build it")
    return json.loads(path.read_text())


def _augmentation(names: list[str], metrics: Path, reports: Path) -> list[str]:
    """The corpus the models read: BERT augmentation counts, the masked LM's fine-tuning, the gates."""
    if not (metrics / "augment.json").is_file():
        return []
    aug, mlm = _read(metrics / "augment.json"), _read(metrics / "mlm.json")
    if not aug.get("enabled"):
        return ["## Augmentation", "", "Off (`augment.enabled: false`): the models read the original text.", ""]
    rows = [[n, f"{m['sentences']:,}", f"{m['synthetic']:,}", f"{m['tokens']:,}",
             f"{m['synthetic_tokens'] / max(m['tokens'], 1):.1%}"] for n, m in aug["models"].items() if n in names]
    gates = []
    for suite in ("raw", "augmented"):
        res = reports / "quality" / f"{suite}.json"
        if res.is_file():
            r = json.loads(res.read_text())
            items = r["expectations"]
            ok = sum(bool(x["success"]) for x in items)
            gates.append(f"- {suite}: {ok}/{len(items)} expectations pass ([details](quality/{suite}.md))")
    return ["## Augmentation (Kumar et al. 2020) and data-quality gates", "",
            f"Masked LM `{mlm['mlm']}` fine-tuned for {mlm['steps']} steps ({mlm['sentences_seen']:,} sentences; "
            f"loss {mlm['loss_first']} -> {mlm['loss_last']}); {aug['sources']:,} training sentences augmented at "
            f"{aug['sentences_per_s']} sentences/s: {aug['masked']:,} words masked, {aug['filled']:,} filled, "
            f"{aug['duplicates']:,} duplicates dropped, {aug['kept']:,} synthetic sentences kept "
            f"({'agreement-safe' if aug['agreement_safe'] else 'not agreement-safe'}).", "",
            _markdown_table(["model", "sentences", "synthetic", "tokens", "synthetic share"], rows), "",
            "Great Expectations gates (run before anything trains):", "", *(gates or ["- not run"]), "",
            *_safety(reports)]


def _study(reports: Path, name: str, title: str, note: str, folder: str = "") -> list[str]:
    """A study a bench script writes to ``reports/<folder>/<name>/<name>.{md,png}``, when it has been run."""
    rel = f"{folder}/{name}" if folder else name
    md = reports / rel / f"{name}.md"
    if not md.is_file():
        return []
    return [f"### {title}", "", f"`python bench/{name}.py` (not part of `dvc repro`: {note}):", "",
            md.read_text().strip(), "", f"![{name}]({rel}/{name}.png)", ""]


def _safety(reports: Path) -> list[str]:
    """The on/off study of ``bench/augment_safety.py``."""
    return _study(reports, "augment_safety", "Augmentation and agreement-safe masking, on vs off",
                  "it trains two more models")


BUCKETS = ("0", "1", "2", "3", "4+")


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``p`` observed on ``n`` items."""
    if not n:
        return 0.0, 1.0
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return max(0.0, c - h), min(1.0, c + h)


def natural_figure(results: dict[str, dict], path: Path) -> Path:
    """Accuracy against the number of attractors (0 .. 4+) per model, with 95 % Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agreelens.plots import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, (name, att) in enumerate(results.items()):
        xs = [i + (k - (len(results) - 1) / 2) * 0.08 for i, b in enumerate(BUCKETS) if att.get(b, {}).get("n")]
        gs = [att[b] for b in BUCKETS if att.get(b, {}).get("n")]
        ys = [100 * g["accuracy"] for g in gs]
        lo_hi = [wilson(g["accuracy"], g["n"]) for g in gs]
        err = [[y - 100 * lo for y, (lo, _) in zip(ys, lo_hi)], [100 * hi - y for y, (_, hi) in zip(ys, lo_hi)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(BUCKETS)), BUCKETS)
    ax.set_xlabel("attractors between subject and verb")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Agreement in held-out real sentences (natural/test.jsonl)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _natural(names: list[str], metrics: Path, reports: Path) -> list[str]:
    """Natural-text agreement by attractor count (test set), as a table and a figure."""
    res = {n: _read(metrics / f"na_{n}.json").get("natural", {}).get("test") for n in names}
    res = {n: r for n, r in res.items() if r}
    if not res:
        return []
    natural_figure({n: r["attractors"] for n, r in res.items()}, reports / "figures" / "natural_attractors.png")
    cell = lambda g: f"{g['accuracy']:.1%} ({g['n']})" if g.get("n") else "-"
    rows = [[n, cell(r), *[cell(r["attractors"].get(b, {})) for b in (*BUCKETS, "2+")]] for n, r in res.items()]
    return ["## Agreement in real sentences, by number of attractors", "",
            "Present-tense verbs with a noun subject in held-out text (the corpora's test split, WikiText-2 "
            "valid/test), found by spaCy's parser; an attractor is a noun of the other number between subject "
            "and verb. Right when log P(written verb) > log P(its number swap) after the sentence's prefix. "
            "Test documents only (`natural/test.jsonl`; dev chose the settings); accuracy (items).", "",
            _markdown_table(["model", "all", *(f"{b} attr." for b in BUCKETS), "2+ attr."], rows), "",
            "![accuracy by attractors](figures/natural_attractors.png)", ""]


def build(names: list[str], metrics: str | Path = "metrics", out: str | Path = "reports/report.md") -> Path:
    metrics, out = Path(metrics), Path(out)
    parts = ["# agreelens report", "",
             "How an LSTM language model trained on learner English (with WikiText-2, by default) tracks "
             "subject-verb agreement, and which "
             "of its units do it. Built by `dvc repro` from `metrics/` and `reports/figures/`; the settings are "
             "in `params.yaml`.", ""]
    t6 = table6(names, metrics, out=None)
    parts += ["## Table 6: perplexity and NA accuracy", "", t6.split("\n\n", 2)[2].strip(), ""]
    parts += _natural(names, metrics, out.parent)
    parts += _study(out.parent, "agreement_levers", "Training levers on/off: plain LM, margin loss, syntax-aware "
                    "augmentation", "it trains a model per arm", folder="studies")
    parts += _augmentation(names, metrics, out.parent)

    parts += ["## Number units (ablation sweep)", "",
              "Every unit of both layers ablated alone (its outgoing weights zeroed) on the NA stimuli; a "
              "number unit costs at least the threshold in accuracy points in some condition. The paper "
              f"(Lakretz et al. 2019 units, re-found in the seed study) names units {PAPER_UNITS} of a 650-unit model.", ""]
    rows = []
    for name in names:
        sw = _read(metrics / f"units_{name}.json")
        units = ", ".join(f"{u['unit']} (L{u['layer']}, -{u['max_drop']:.0f} in {u['condition']})"
                          for u in sw["number_units"][:8]) or "none"
        more = f" and {len(sw['number_units']) - 8} more" if len(sw["number_units"]) > 8 else ""
        rows.append([name, f"{sw['layers']} x {sw['hidden_size']}", str(len(sw["number_units"])), units + more])
    parts += [_markdown_table(["model", "LSTM", "number units", "strongest (layer, largest drop in points)"], rows), ""]

    for name in names:
        t7 = _read(metrics / f"table7_{name}.json")
        header, rows7 = table7_rows(t7)
        parts += [f"## Table 7 ({name}): accuracy (%) after ablating units {', '.join(map(str, t7['units']))}", "",
                  f"'-': the drop is under {t7['threshold']:g} points, as in the paper.", "",
                  _markdown_table(header, rows7), ""]

    parts += ["## Figures", "",
              "Cell state, hidden state, input and forget gate of the chosen units over nounpp sentences (the "
              "paper's Figures 2-3; blue singular subject, red plural; solid: attractor of the same number, "
              "dashed: of the other), and gate saturation (Karpathy et al. 2015: fraction of steps a gate is "
              "below 0.1 vs above 0.9, one dot per unit).", "",
              "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for kind in ("units", "saturation", "sweep"):
        parts.append("| " + " | ".join(f"![{kind} {n}](figures/{kind}_{n}.png)" for n in names) + " |")
    parts.append("")

    probes = {n: _read(metrics / f"probe_{n}.json") for n in names}
    cons = list(dict.fromkeys(c for r in probes.values() for c in r["classifier"]["constructions"]))
    rows = [[n, f"{r['classifier']['accuracy']:.1%}",
             *[f"{r['classifier']['constructions'][c]['accuracy']:.1%}" if c in r["classifier"]["constructions"]
               else "-" for c in cons]] for n, r in probes.items()]
    rows_b = []
    for n, r in probes.items():
        for c, best in verb_decoding(r).items():
            rows_b.append([n, c, *[f"{best[k][0]:.1%} ({best[k][1]})" for k in ("before", "at")]])
    first = next(iter(probes.values()))
    parts += ["## Probing classifiers", "",
              f"Frozen states, pairs split by pairID ({first['heldout']:.0%} of each construction's pairs held "
              "out, both sentences of a pair on one side); held-out accuracy. (a) Good vs bad sentence from "
              f"{first['features']}, max-pooled over the words: a feed-forward layer with sigmoid, then "
              "log-softmax, trained with NLL.", "",
              _markdown_table(["model", "all", *cons], rows), "",
              "(b) Diagnostic classifiers (Giulianelli et al. 2018): logistic regression on c and h of each "
              "layer decodes the subject's number at every word of the correct sentences. Best (layer.state) "
              "accuracy at the word before the verb (the state that predicts it) and at the verb:", "",
              _markdown_table(["model", "construction", "before the verb", "at the verb"], rows_b), "",
              "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
              "| " + " | ".join(f"![probe {n}](figures/probe_{n}.png)" for n in names) + " |", ""]

    ev = _read(metrics / "eval.json")
    ppl = {n: ev[n]["test_ppl"] for n in names}
    na = {n: _read(metrics / f"na_{n}.json")["accuracy"] for n in names}
    cmp = [f"- **{n}**: test PPL {ppl[n]:.1f} (paper {PAPER_TABLE6.get(n, {}).get('ppl', '-')}), NA "
           f"{na[n]:.1%} (paper {PAPER_TABLE6.get(n, {}).get('na', '-')} %)" for n in names]
    tokens = " / ".join(f"{ev[n]['train_tokens'] / 1e6:.1f} M" for n in names if "train_tokens" in ev.get(n, {}))
    parts += ["## Beside the paper", "", *cmp,
              f"- The paper's models read 52.5 M / 102.5 M tokens of BERT-augmented learner text on a GPU; these "
              f"read the corpora of `params.yaml` (`data.corpora`; {tokens} training tokens, `metrics/eval.json`) "
              "on 2 CPU cores, so perplexities are not comparable (other corpus and vocabulary).", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out
