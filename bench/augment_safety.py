"""Does augmentation help number agreement, and does the agreement-safe option matter? (issue: BERT
augmentation, "the report shows the effect of this option on NA accuracy (on vs off)").

Three arms of one model size (default ``small``), same settings, same trainer, same NA stimuli:

- ``original``: the original training text only (``prepared/train_<model>.txt``);
- ``safe``: original + synthetic sentences with agreement-safe masking (the pipeline's setting: by
  default the pipeline's own ``models/<model>`` and ``metrics/na_<model>.json`` are reused, ``--retrain-safe``
  trains it again);
- ``unsafe``: original + synthetic sentences from the same fine-tuned masked LM (``models/mlm``) and the
  same sources and seed, but with ``agreement_safe: false`` (number words may be masked and replaced).

Writes ``OUT/augment_safety.json`` and ``OUT/augment_safety.md`` (accuracy per construction and per
nounpp condition) and ``OUT/augment_safety.png``; ``agreelens build-report`` shows them when
``OUT`` is ``reports/augment_safety`` (the default). Needs the pipeline's outputs (``dvc repro``).

    python bench/augment_safety.py [--model small] [--out reports/augment_safety]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreelens.augment import run_augment  # noqa: E402
from agreelens.config import load_params  # noqa: E402
from agreelens.model import load_model  # noqa: E402
from agreelens.plots import save_figure  # noqa: E402
from agreelens.scoring import read_pairs, score_pairs  # noqa: E402
from agreelens.train import Paths, train  # noqa: E402


def _score(model_dir: Path, stimuli: Path) -> dict:
    model, vocab = load_model(model_dir)
    res = score_pairs(model, vocab, read_pairs(sorted(stimuli.glob("*.jsonl"))))
    return {"accuracy": res["accuracy"], "n": res["n"], "groups": {k: v["accuracy"] for k, v in res["groups"].items()}}


def _train_arm(params, name: str, text: Path, work: Path, stimuli: Path, reuse: bool = False) -> dict:
    """Train one arm (or, with ``reuse``, take the model a previous run of this script left in ``work``)
    and score it on the NA stimuli."""
    paths = Paths.scratch(params, text, work)
    if reuse and paths.metrics.is_file() and (paths.model_dir / "model.safetensors").is_file():
        summary = json.loads(paths.metrics.read_text())
    else:
        summary = train(params, name, paths, quiet=True)
    return {"train_tokens": summary["train_tokens"], "best_valid_ppl": summary["best_valid_ppl"],
            "seconds": summary.get("train_seconds"), **_score(paths.model_dir, stimuli)}


def _by_construction(groups: dict) -> dict:
    out: dict[str, list[float]] = {}
    for key, acc in groups.items():
        out.setdefault(key.split("/")[0], []).append(acc)
    return {k: sum(v) / len(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="model size (prepare.sizes key)")
    ap.add_argument("--out", default="reports/augment_safety")
    ap.add_argument("--work", default="runs/augment_safety", help="scratch folder for the extra models")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--retrain-safe", action="store_true", help="train the safe arm too (default: reuse the pipeline's)")
    ap.add_argument("--reuse", action="store_true", help="take the models and text a previous run left in --work")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    params = load_params(args.params)
    stimuli = Path(params.train.na_stimuli or "stimuli")
    name = args.model
    arms: dict[str, dict] = {}

    print(f"[original] training {name} on {params.prepare.out}/train_{name}.txt", flush=True)
    arms["original"] = _train_arm(params, name, Path(params.prepare.out) / f"train_{name}.txt", work / "original",
                                  stimuli, args.reuse)

    if args.retrain_safe:
        print("[safe] training on the pipeline's augmented text", flush=True)
        arms["safe"] = _train_arm(params, name, Path(params.augment.out) / f"train_{name}.txt", work / "safe",
                                  stimuli, args.reuse)
    else:
        tm = json.loads(Path(f"metrics/train_{name}.json").read_text())
        arms["safe"] = {"train_tokens": tm["train_tokens"], "best_valid_ppl": tm["best_valid_ppl"],
                        "seconds": tm.get("train_seconds"), "reused": f"models/{name}",
                        **_score(Path("models") / name, stimuli)}

    unsafe = params.model_copy(update={"augment": params.augment.model_copy(
        update={"agreement_safe": False, "out": str(work / "unsafe_text")})})
    print("[unsafe] augmenting without agreement safety (same masked LM, sources, seed)", flush=True)
    pipeline_stats = Path("metrics/augment.json")
    before = pipeline_stats.read_bytes() if pipeline_stats.is_file() else None
    try:
        if not (args.reuse and (work / "unsafe_text" / f"train_{name}.txt").is_file()):
            run_augment(unsafe, progress=True)
    finally:  # run_augment writes its stats to metrics/augment.json: the pipeline's file is put back
        if before is not None:
            pipeline_stats.write_bytes(before)
    arms["unsafe"] = _train_arm(unsafe, name, work / "unsafe_text" / f"train_{name}.txt", work / "unsafe", stimuli,
                                args.reuse)

    result = {"model": name, "profile": params.profile, "arms": arms,
              "constructions": {a: _by_construction(r["groups"]) for a, r in arms.items()}}
    (out / "augment_safety.json").write_text(json.dumps(result, indent=2) + "\n")
    cons = list(result["constructions"]["original"])
    lines = [f"NA accuracy (%) of the {name} model: original text only vs + agreement-safe synthetic text "
             "(the pipeline) vs + synthetic text with number words maskable (`agreement_safe: false`).", "",
             "| arm | tokens | valid PPL | NA all | " + " | ".join(cons) + " | nounpp SS/SP/PS/PP |",
             "|---|---:|---:|---:|" + "---:|" * (len(cons) + 1)]
    for a, r in arms.items():
        nounpp = "/".join(f"{100 * r['groups'].get(f'nounpp/{c}', float('nan')):.0f}" for c in ("SS", "SP", "PS", "PP"))
        lines.append(f"| {a} | {r['train_tokens']:,} | {r['best_valid_ppl']:.1f} | {100 * r['accuracy']:.1f} | "
                     + " | ".join(f"{100 * result['constructions'][a][c]:.1f}" for c in cons) + f" | {nounpp} |")
    (out / "augment_safety.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(arms)
    for i, (a, accs) in enumerate(result["constructions"].items()):
        ax.bar([j + i * width for j in range(len(cons))], [100 * accs[c] for c in cons], width, label=a)
    ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(cons))], cons, fontsize=8)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("NA accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: augmentation on/off and agreement-safe masking on/off")
    save_figure(fig, out / "augment_safety.png")


if __name__ == "__main__":
    main()
