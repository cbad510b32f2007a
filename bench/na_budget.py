"""What training budget buys number agreement? NA accuracy per epoch for a list of configurations.

Each configuration is the current params.yaml (its profile) plus overrides, trained with the real
trainer (``agreelens.train.train``) on the prepared corpus, scoring the NA stimuli at every validation.
Results go to ``OUT/na_budget.json`` and ``OUT/na_budget.csv`` after every configuration (so a run
cut short keeps what it finished) and ``OUT/na_budget.png`` (NA accuracy and nounpp accuracy vs epoch).

    python bench/na_budget.py --out runs/budget \
        --config base \
        --config wide:model.hidden_size=650,model.emb_size=650 \
        --epochs 10

Needs ``prepared/`` (``agreelens prepare``) and ``stimuli/`` (``agreelens stimuli``). Runs on CUDA when
present; the reported ``cpu_minutes_est`` converts tokens seen to minutes at ``--cpu-tok-s`` (the default
trainer's measured CPU rate on 2 cores for the default model) so a GPU run answers a CPU budget question.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreelens.config import load_params, resolve  # noqa: E402
from agreelens.model import load_model  # noqa: E402
from agreelens.scoring import read_pairs, score_pairs  # noqa: E402
from agreelens.train import Paths, train  # noqa: E402


def parse_value(text: str):
    return yaml.safe_load(text)


def override(raw: dict, dotted: str, value) -> None:
    node = raw
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[],
                    help="NAME[:key=value,key=value] (dotted params keys); repeatable")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--model", default="large", help="training split (prepare.sizes key); per config: split=small")
    ap.add_argument("--out", default="runs/na_budget")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cpu-tok-s", type=float, default=17800.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.params).read_text())
    load_params(args.params)  # validates the file itself first
    results = []
    for spec in args.config or ["base"]:
        name, _, rest = spec.partition(":")
        raw = json.loads(json.dumps(base))
        override(raw, "train.epochs", args.epochs)
        override(raw, "train.evals_per_epoch", 1)
        split = args.model
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key.strip() == "split":  # which training split this configuration trains on
                split = value.strip()
                continue
            override(raw, key.strip(), parse_value(value))
        params = resolve(raw, source=f"{args.params} + {spec}")
        paths = Paths.scratch(params, Path(params.augment.out) / f"train_{split}.txt", out / name)
        t0 = time.perf_counter()
        summary = train(params, split, paths, quiet=True)
        wall = time.perf_counter() - t0
        model, vocab = load_model(paths.model_dir)
        pairs = read_pairs(sorted(Path(params.train.na_stimuli or "stimuli").glob("*.jsonl")))
        final = score_pairs(model, vocab, pairs)
        rows = list(csv.DictReader(paths.curve.open()))
        per_token = {k: round(v["accuracy"], 3) for k, v in final["groups"].items()}
        res = {"name": name, "split": split, "overrides": rest, "epochs": args.epochs, "wall_s": round(wall, 1),
               "summary": summary, "final_na": round(final["accuracy"], 4), "final_groups": per_token,
               "curve": [{k: r[k] for k in ("epoch", "tokens", "valid_ppl", "na_accuracy", "na_nounpp")} for r in rows]}
        results.append(res)
        print(f"{name}: {wall:.0f}s  best valid ppl {summary['best_valid_ppl']}  NA {final['accuracy']:.3f}", flush=True)
        for r in res["curve"]:
            print(f"   epoch {float(r['epoch']):5.2f}  ppl {float(r['valid_ppl']):7.2f}  NA {r['na_accuracy']}  nounpp {r['na_nounpp']}")
        print("   " + "  ".join(f"{k} {v}" for k, v in per_token.items()), flush=True)
        write(out, results, args.cpu_tok_s)


def write(out: Path, results: list[dict], cpu_tok_s: float) -> None:
    (out / "na_budget.json").write_text(json.dumps(results, indent=1) + "\n")
    with (out / "na_budget.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["config", "epoch", "tokens", "cpu_minutes_est", "valid_ppl", "na_accuracy", "na_nounpp"])
        for r in results:
            for p in r["curve"]:
                w.writerow([r["name"], p["epoch"], p["tokens"], round(int(p["tokens"]) / cpu_tok_s / 60, 1),
                            p["valid_ppl"], p["na_accuracy"], p["na_nounpp"]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in results:
        ep = [float(p["epoch"]) for p in r["curve"]]
        axes[0].plot(ep, [float(p["na_accuracy"]) for p in r["curve"]], marker="o", label=r["name"])
        axes[1].plot(ep, [float(p["na_nounpp"]) for p in r["curve"]], marker="o", label=r["name"])
    for ax, title in zip(axes, ["NA accuracy (all constructions)", "nounpp accuracy"]):
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "na_budget.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
