"""NA-task evaluation: stimuli stage, per-model accuracy (overall / construction / condition), BLiMP,
and the paper's Table 6."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from agreelens.config import Params
from agreelens.corpus import read_counts
from agreelens.model import default_device, load_model
from agreelens.scoring import read_pairs, score_pairs
from agreelens.stimuli import NUMBER_POOLS, generate, split_lexicon, write
from agreelens.vocab import Vocab

PAPER_TABLE6 = {"small": {"ppl": 110.2, "na": 89.3}, "large": {"ppl": 51.0, "na": 99.57}}
BLIMP_DIR = Path("data") / "blimp"


def resolve_model(spec: str | Path) -> Path:
    """``large``, ``models/large``, any model directory, or a registry URI ``models:/<name>@<alias>``."""
    if str(spec).startswith("models:/"):
        from agreelens.registry import fetch

        return fetch(str(spec))
    for cand in (Path(spec), Path("models") / str(spec)):
        if (cand / "model.safetensors").is_file():
            return cand
    known = sorted(p.parent.name for p in Path("models").glob("*/model.safetensors"))
    raise FileNotFoundError(f"model '{spec}' not found (models/: {', '.join(known) or 'none trained yet'})")


def make_stimuli(params: Params, out: str | Path = "stimuli", report_path: str | Path = "metrics/stimuli.json") -> dict:
    """NA stimuli of the test lexicon in ``out/`` (what every figure reports) and of the disjoint dev
    lexicon in ``out/dev/`` (what settings are chosen on: the training curve); the test report, with
    the dev report under ``"dev"`` and both lexicons under ``"lexicon"``."""
    vocab = Vocab.load(Path(params.prepare.out) / "vocab.txt")
    counts = read_counts(Path(params.prepare.out) / "counts.tsv")
    halves = split_lexicon(params.stimuli)
    records, report = generate(halves["test"], vocab, counts)
    dev_records, dev_report = generate(halves["dev"], vocab, counts)
    write(records, out)
    write(dev_records, Path(out) / "dev")
    report["dev"] = dev_report
    report["lexicon"] = {name: {pool: [e[0] for e in getattr(cfg, pool)] for pool in NUMBER_POOLS}
                         for name, cfg in halves.items()}
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _by(groups: dict, part: int) -> dict:
    """Pool ``construction/condition`` groups by construction (part 0) or condition (part 1)."""
    out: dict[str, dict] = {}
    for key, g in groups.items():
        name = key.split("/")[part]
        acc = out.setdefault(name, {"correct": 0.0, "n": 0})
        acc["correct"] += g["accuracy"] * g["n"]
        acc["n"] += g["n"]
    return {k: {"accuracy": round(v["correct"] / v["n"], 4) if v["n"] else 0.0, "n": v["n"]} for k, v in out.items()}


def natural_summary(r: dict) -> dict:
    """Natural-text accuracy overall, per attractor count (0 .. 4+, and 2+ pooled) and per source."""
    att = r.get("attractors", {})
    two = [(g["accuracy"], g["n"]) for k, g in att.items() if k not in ("0", "1")]
    n2 = sum(n for _, n in two)
    att = {**att, "2+": {"accuracy": sum(a * n for a, n in two) / n2 if n2 else 0.0, "n": n2}}
    rnd = lambda g: {"accuracy": round(g["accuracy"], 4), "n": g["n"]}
    return {"accuracy": round(r["accuracy"], 4), "n": r["n"], "oov": r["oov"],
            "attractors": {k: rnd(g) for k, g in att.items()},
            "sources": {k.removeprefix("natural_"): rnd(g) for k, g in r["groups"].items()}}


def evaluate_na(params: Params, name: str, stimuli_dir: str | Path = "stimuli", blimp_dir: str | Path = BLIMP_DIR,
                out: str | Path | None = None) -> dict:
    torch.set_num_threads(params.train.threads or os.cpu_count() or 1)
    model, vocab = load_model(resolve_model(name), default_device())
    files = sorted(Path(stimuli_dir).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{stimuli_dir}: no stimuli; run `agreelens stimuli` (or `dvc repro`)")
    na = score_pairs(model, vocab, read_pairs(files), batch_size=params.evaluate.batch_size * 4)
    result = {"model": name, "accuracy": round(na["accuracy"], 4), "n": na["n"], "oov": na["oov"],
              "constructions": _by(na["groups"], 0), "conditions": _by(na["groups"], 1),
              "groups": {k: {"accuracy": round(g["accuracy"], 4), "n": g["n"]} for k, g in na["groups"].items()}}
    blimp_files = sorted(Path(blimp_dir).glob("*.jsonl"))
    if blimp_files:
        b = score_pairs(model, vocab, read_pairs(blimp_files), batch_size=params.evaluate.batch_size * 4)
        result["blimp"] = {"accuracy": round(b["accuracy"], 4), "n": b["n"], "oov": b["oov"],
                           "phenomena": {k: {"accuracy": round(g["accuracy"], 4), "n": g["n"]}
                                         for k, g in b["groups"].items()}}
    result["natural"] = {}
    for split in ("dev", "test"):  # natural-text agreement by attractor count (test: what is reported)
        path = Path(params.natural.out) / f"{split}.jsonl"
        if path.is_file():
            r = score_pairs(model, vocab, read_pairs(path), batch_size=params.evaluate.batch_size * 4)
            result["natural"][split] = natural_summary(r)
    out = Path(out or f"metrics/na_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table6(names: list[str], metrics: str | Path = "metrics", out: str | Path | None = "reports/table6.md") -> str:
    """Table 6 of the paper (PPL and NA accuracy, small vs large), ours beside the paper's."""
    metrics = Path(metrics)
    ev = json.loads((metrics / "eval.json").read_text())
    rows = ["| model | train tokens | test PPL | NA accuracy | natural 0 / 1 / 2+ attractors | paper PPL | paper NA accuracy |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    detail = []
    for name in names:
        na = json.loads((metrics / f"na_{name}.json").read_text())
        paper = PAPER_TABLE6.get(name, {})
        att = na.get("natural", {}).get("test", {}).get("attractors", {})
        natural = " / ".join(f"{att[k]['accuracy']:.1%}" if att.get(k, {}).get("n") else "-" for k in ("0", "1", "2+"))
        rows.append(f"| {name} | {ev[name].get('train_tokens', 0):,} | {ev[name]['test_ppl']:.1f} | "
                    f"{na['accuracy']:.2%} | {natural} | {paper.get('ppl', '-')} | {paper.get('na', '-')} % |")
        cons = " · ".join(f"{k} {v['accuracy']:.0%}" for k, v in na["constructions"].items())
        detail.append(f"- **{name}** per construction: {cons}")
        nounpp = " · ".join(f"{k.split('/')[1]} {v['accuracy']:.0%}" for k, v in na["groups"].items()
                            if k.startswith("nounpp/"))
        detail.append(f"- **{name}** nounpp by condition: {nounpp}")
        if "blimp" in na:
            ph = " · ".join(f"{k} {v['accuracy']:.0%}" for k, v in na["blimp"]["phenomena"].items())
            detail.append(f"- **{name}** BLiMP ({na['blimp']['accuracy']:.1%} of {na['blimp']['n']}, "
                          f"{na['blimp']['oov']} OOV pairs not scored): {ph}")
    text = ("# Table 6: perplexity and number-agreement accuracy\n\n"
            "Built by `dvc repro` (stage `table6`) from `metrics/eval.json` and `metrics/na_*.json`. "
            "The paper trains on 52.5 M / 102.5 M tokens of augmented textbook English on a GPU; "
            "ours trains on the profile in `params.yaml`. NA accuracy is on the test lexicon's stimuli; "
            "natural: held-out real sentences (`natural/test.jsonl`) by number of attractors.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(detail) + "\n")
    if out is not None:  # None: return the text only
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text
