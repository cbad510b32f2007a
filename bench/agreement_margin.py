"""Does the agreement margin loss (Noji & Takamura 2020; ``train.agreement_loss``) teach number
agreement across attractors for verbs it never saw in the loss?

Two arms of one model size (default ``large``), same text, settings, seed and NA stimuli:

- ``plain``: the LM loss alone (``agreement_loss: 0``);
- ``margin``: LM loss + the margin loss on the verb pairs found in the training text, the NA task's
  verbs (both lexicons) always left out: what it learns about them comes from other verbs.

The arm whose settings equal ``params.yaml``'s is taken from the pipeline (``models/<model>``) unless
``--retrain``; the others are trained into ``--work``. Writes ``OUT/agreement_margin.{json,md,png}``
(accuracy per construction and nounpp condition, BLiMP, valid PPL, and the NA curve per epoch);
``agreelens build-report`` shows them when ``OUT`` is ``reports/agreement_margin`` (the default).

    python bench/agreement_margin.py [--model large] [--weight 1.0] [--reuse]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreelens.config import load_params  # noqa: E402
from agreelens.na import evaluate_na  # noqa: E402
from agreelens.plots import save_figure  # noqa: E402
from agreelens.train import Paths, train  # noqa: E402

CONDITIONS = ("SS", "SP", "PS", "PP")


def _arm_params(params, weight: float):
    t = params.train.model_copy(update={"agreement_loss": weight})
    return params.model_copy(update={"train": t})


def _run_arm(params, name: str, arm: str, work: Path, reuse: bool) -> dict:
    paths = Paths.scratch(params, Path(params.augment.out) / f"train_{name}.txt", work)
    if not (reuse and paths.metrics.is_file() and (paths.model_dir / "model.safetensors").is_file()):
        print(f"[{arm}] training {name} (agreement_loss {params.train.agreement_loss})", flush=True)
        train(params, name, paths, quiet=False)
    summary = json.loads(paths.metrics.read_text())
    na = evaluate_na(params, str(paths.model_dir), stimuli_dir="stimuli",
                     out=work / "na.json")
    return _row(summary, na, paths.curve)


def _row(summary: dict, na: dict, curve: Path) -> dict:
    rows = list(csv.DictReader(curve.open())) if curve.is_file() else []
    return {"best_valid_ppl": summary["best_valid_ppl"], "train_seconds": summary.get("train_seconds"),
            "agreement_pairs": summary.get("agreement_pairs", 0), "accuracy": na["accuracy"],
            "constructions": {k: c["accuracy"] for k, c in na["constructions"].items()}, "groups": {k: g["accuracy"] for k, g in na["groups"].items()},
            "blimp": na.get("blimp", {}).get("accuracy"),
            "curve": [{"epoch": float(r["epoch"]), "na": float(r["na_accuracy"]), "nounpp": float(r["na_nounpp"])}
                      for r in rows if r.get("na_accuracy")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="large", help="model size (prepare.sizes key)")
    ap.add_argument("--weight", type=float, default=0.0,
                    help="agreement_loss of the margin arms (default: params.yaml's, or 1.0 where that is 0)")
    ap.add_argument("--out", default="reports/agreement_margin")
    ap.add_argument("--work", default="runs/agreement_margin", help="scratch folder for the extra models")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--retrain", action="store_true", help="train every arm (default: reuse the pipeline's model)")
    ap.add_argument("--reuse", action="store_true", help="take the models a previous run left in --work")
    args = ap.parse_args()
    params = load_params(args.params)
    name, out = args.model, Path(args.out)
    weight = args.weight or params.train.agreement_loss or 1.0
    arms = {"plain": 0.0, "margin": weight}
    results = {}
    for arm, w in arms.items():
        arm_params = _arm_params(params, w)
        pipeline = (arm_params.train == params.train and Path(f"metrics/train_{name}.json").is_file()
                    and not args.retrain)
        if pipeline:
            print(f"[{arm}] the pipeline's models/{name}", flush=True)
            na = evaluate_na(params, f"models/{name}", stimuli_dir="stimuli",
                             out=Path(args.work) / f"{name}_{arm}" / "na.json")
            results[arm] = {**_row(json.loads(Path(f"metrics/train_{name}.json").read_text()), na,
                                   Path(f"plots/learning_{name}.csv")), "reused": f"models/{name}"}
        else:
            results[arm] = _run_arm(arm_params, name, arm, Path(args.work) / f"{name}_{arm}", args.reuse)
    _write(results, name, weight, params.train.agreement_margin, out)


def _write(results: dict, name: str, weight: float, delta: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement_margin.json").write_text(json.dumps(
        {"model": name, "weight": weight, "delta": delta, "arms": results}, indent=2) + "\n")
    cons = list(next(iter(results.values()))["constructions"])
    lines = [f"NA accuracy (%) of the {name} model with and without the agreement margin loss (weight {weight}, "
             f"margin {delta} nats; the NA task's verbs never in the loss), test lexicon.", "",
             "| arm | verb pairs | valid PPL | BLiMP | NA all | " + " | ".join(cons) + " | nounpp SS/SP/PS/PP |",
             "|---|---:|---:|---:|---:|" + "---:|" * (len(cons) + 1)]
    for arm, r in results.items():
        nounpp = "/".join(f"{100 * r['groups'].get(f'nounpp/{c}', float('nan')):.0f}" for c in CONDITIONS)
        blimp = f"{100 * r['blimp']:.1f}" if r["blimp"] is not None else "-"
        lines.append(f"| {arm} | {r['agreement_pairs']} | {r['best_valid_ppl']:.1f} | {blimp} | "
                     f"{100 * r['accuracy']:.1f} | " + " | ".join(f"{100 * r['constructions'][c]:.1f}" for c in cons)
                     + f" | {nounpp} |")
    (out / "agreement_margin.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cx) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(results)
    for i, (arm, r) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(cons))], [100 * r["constructions"][c] for c in cons], width,
               label=arm)
        if r["curve"]:
            cx.plot([p["epoch"] for p in r["curve"]], [100 * p["nounpp"] for p in r["curve"]], marker="o",
                    label=f"{arm}: nounpp")
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(cons))], cons, fontsize=8)
    for a in (ax, cx):
        a.axhline(50, color="grey", lw=0.8, ls=":")
        a.set_ylim(0, 118)  # room above the bars for the legend
        a.set_yticks(range(0, 101, 20))
        a.legend(fontsize=8, loc="upper center", ncol=3)
    ax.set_ylabel("NA accuracy (%)")
    ax.set_title(f"{name}: agreement margin loss on/off, NA verbs held out")
    cx.set_xlabel("epoch")
    cx.set_title("nounpp accuracy during training")
    save_figure(fig, out / "agreement_margin.png")


if __name__ == "__main__":
    main()
