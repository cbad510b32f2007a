"""Which training levers make the LSTM track the subject instead of the nearest noun? One table, one budget.

Arms of one model size (default ``large``), same corpus, vocabulary, epochs, seed and evaluation:

- ``plain``: the language-model loss alone (``train.agreement_loss: 0``), BERT-augmented text;
- ``margin``: + the agreement margin loss (``train.agreement_loss`` of params.yaml, NA-task verbs never in it);
- ``syntax``: the plain loss on the text with syntax-aware augmentation (``syntax/train_<model>.txt``:
  modifiers holding a noun of the other number inserted between subject and verb);
- ``margin+syntax``: both;
- ``margin+mixed``: the margin loss on syntax-aware text whose inserted modifiers hold a noun of the other
  number half of the time (``syntax.other_number: 0.5``) and of the subject's own number otherwise, so the
  noun next to the verb no longer tells the verb's number the opposite way;
- ``margin+syntax+attrW``: ``margin+syntax`` with the margin term weighted W times (default 4) at verbs
  whose nearest preceding noun has the other number (``train.attractor_weight``);
- ``...+numN``: any arm with the auxiliary subject-number objective at weight N (default 1;
  ``train.number_loss``): a linear readout of the state before each margin-loss verb must tell its number;
- ``...+nounN``: any margin arm with the margin term also on nouns right after a determiner of their number
  ("these books", "a book"), at weight N (default 1; ``train.noun_weight``): determiner-noun agreement;
- ``...+biasB``: any arm with every LSTM gate bias starting at B (default 0; ``model.lstm_bias``) instead of
  torch's random uniform init;
- ``...+stackS``: any syntax arm with a share S (default 0.5) of its insertions stacking two prepositional
  modifiers of the other number (``syntax.stack``): two or more attractors;
- ``margin+syntax+wiki``: ``margin+syntax`` with WikiText-2's training split added to the corpora
  (``data.corpora + [wikitext2]``, its own vocabulary of ``--wiki-vocab`` words, prepared under ``--work``):
  more natural text with subjects and verbs apart. Its valid split includes WikiText-2's, its test split
  WikiText-2's test file, which the natural benchmark's test documents come from: never trained on.

Settings are chosen on **dev** (natural-text dev items with at least one attractor, the NA task's dev
lexicon; for nouns, the checker benchmark's dev sentences with a noun after this/these/those); the test
columns (natural test by attractor count, the NA task's test lexicon, BLiMP) chose nothing.
An arm whose settings equal the pipeline's is taken from ``models/<model>`` unless ``--retrain``; the others
are trained into ``--work`` (``--reuse`` keeps what an earlier run left there). Writes
``OUT/agreement_levers.{json,md,png}``.

    python bench/agreement_levers.py [--model large] [--arms plain,margin,syntax,margin+syntax,margin+syntax+attr4] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreelens.config import load_params  # noqa: E402
from agreelens.na import evaluate_na  # noqa: E402
from agreelens.plots import save_figure  # noqa: E402
from agreelens.train import Paths, train  # noqa: E402

# arm: (margin loss, syntax-aware text: None = off, else the share of other-number modifiers; 1.0 = the pipeline's)
ARMS = {"plain": (False, None), "margin": (True, None), "syntax": (False, 1.0), "margin+syntax": (True, 1.0),
        "margin+mixed": (True, 0.5), "margin+syntax+wiki": (True, 1.0)}
MODIFIERS = {"attr": 4.0, "stack": 0.5, "num": 1.0, "noun": 1.0, "bias": 0.0}  # arm suffixes (+attr4, +stack0.5, ...), defaults
WIKI_ARMS = {"margin+syntax+wiki"}
BUCKETS = ("0", "1", "2+")


def _wiki_text(params, name: str, work: Path, max_vocab: int):
    """Settings with WikiText-2 among the corpora (prepared under ``work``) and the training text: the new
    ``train_<name>.txt`` plus the pipeline's synthetic sentences (BERT and syntax-aware) for that model."""
    from agreelens.corpus import prepare, read_split

    data = params.data.model_copy(update={"corpora": [*params.data.corpora, "wikitext2"]})
    prep = params.prepare.model_copy(update={"out": str(work / "prepared"), "max_vocab": max_vocab})
    wiki = params.model_copy(update={"data": data, "prepare": prep})
    text = work / f"train_{name}.txt"
    if not text.is_file():
        if not (work / "prepared" / f"train_{name}.txt").is_file():
            prepare(wiki, metrics_path=work / "prepare.json")
        original = set(read_split(Path(params.prepare.out) / f"train_{name}.txt"))
        synthetic = [x for x in read_split(Path(params.syntax.out) / f"train_{name}.txt") if x not in original]
        lines = read_split(work / "prepared" / f"train_{name}.txt") + synthetic
        text.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    return wiki, text.parent


def parse_arm(arm: str) -> tuple[str, dict[str, float]]:
    """``"margin+syntax+attr4+stack"`` -> ``("margin+syntax", {"attr": 4.0, "stack": 0.5})``."""
    base, mods = [], {}
    for part in arm.split("+"):
        m = re.fullmatch(r"(attr|stack|num|noun|bias)([0-9.]*)", part)
        if m:
            mods[m[1]] = float(m[2]) if m[2] else MODIFIERS[m[1]]
        else:
            base.append(part)
    core = "+".join(base)
    if core not in ARMS:
        raise SystemExit(f"--arms: unknown arm '{arm}' (arms: {', '.join(ARMS)}; suffixes: "
                         + ", ".join(f"+{k}<value>" for k in MODIFIERS) + ")")
    return core, mods


def _arm(params, margin: bool, other_number: float | None, work: Path, stack: float = 0.0):
    """The arm's settings and the folder of its training text (written here when it is not the pipeline's)."""
    from agreelens.syntax import run_augment_syntax

    t = params.train.model_copy(update={"agreement_loss": params.train.agreement_loss if margin else 0.0})
    arm_params = params.model_copy(update={"train": t})
    if other_number is None:
        return arm_params, Path(params.augment.out)
    if other_number == params.syntax.other_number and stack == params.syntax.stack:
        return arm_params, Path(params.syntax.out)
    text_dir = work / "syntax"
    if not (text_dir / "pairs.tsv").is_file():
        s = params.syntax.model_copy(update={"other_number": other_number, "stack": stack, "out": str(text_dir),
                                            "enabled": True})
        run_augment_syntax(params.model_copy(update={"syntax": s}), metrics_path=text_dir / "syntax.json")
    return arm_params, text_dir


def _pooled(att: dict, keys) -> tuple[float, int]:
    gs = [att[k] for k in keys if att.get(k, {}).get("n")]
    n = sum(g["n"] for g in gs)
    return (sum(g["accuracy"] * g["n"] for g in gs) / n if n else 0.0), n


def noun_pairs_of(records: list[dict]) -> list[dict]:
    """Minimal pairs of the checker benchmark's noun sites (a noun after this/these/those): the sentence up to
    the noun, the written noun and its number swap."""
    from agreelens.text import tokenize

    pairs = []
    for rec in records:
        toks = tokenize(rec["text"])
        for e in rec["errors"]:
            if e["kind"] == "noun":
                i, prefix = e["position"], " ".join(toks[:e["position"]])
                pairs.append({"sentence_good": " ".join(toks), "sentence_bad": " ".join([*toks[:i], e["alternate"],
                              *toks[i + 1:]]), "UID": "noun", "pairID": f"{rec['doc']}/{len(pairs)}",
                              "one_prefix_prefix": prefix, "one_prefix_word_good": e["word"],
                              "one_prefix_word_bad": e["alternate"]})
    return pairs


def _dev_nouns(params, model_dir: Path) -> list:
    """[accuracy, n] on the dev noun pairs (:func:`noun_pairs_of`), [None, 0] without the checker benchmark."""
    from agreelens.model import default_device, load_model
    from agreelens.scoring import score_pairs

    path = Path(params.checkbench.out) / "dev.jsonl"
    if not path.is_file():
        return [None, 0]
    pairs = noun_pairs_of([json.loads(x) for x in path.read_text().splitlines() if x.strip()])
    model, vocab = load_model(model_dir, default_device())
    r = score_pairs(model, vocab, pairs, batch_size=params.evaluate.batch_size * 4)
    return [r["accuracy"], r["n"]]


def _evaluate(params, model_dir: Path, summary: dict, work: Path) -> dict:
    dev = evaluate_na(params, str(model_dir), stimuli_dir="stimuli/dev", out=work / "na_dev.json")
    test = evaluate_na(params, str(model_dir), stimuli_dir="stimuli", out=work / "na_test.json")
    nat_dev, nat_test = dev["natural"]["dev"]["attractors"], test["natural"]["test"]["attractors"]
    seconds = summary.get("train_seconds") or 0
    return {
        "valid_ppl": summary["best_valid_ppl"], "train_seconds": seconds,
        "tokens_per_second": summary.get("tokens_per_second"), "tokens_seen": summary.get("tokens_seen"),
        "dev": {"natural_attr": _pooled(nat_dev, [k for k in nat_dev if k != "0"]),
                "natural_0": _pooled(nat_dev, ["0"]), "natural_2+": _pooled(nat_dev, ["2", "3", "4+"]),
                "na": dev["accuracy"],
                "na_nounpp": dev["constructions"].get("nounpp", {}).get("accuracy"),
                "nouns": _dev_nouns(params, model_dir)},
        "test": {"natural": {b: _pooled(nat_test, [b] if b != "2+" else ["2", "3", "4+"]) for b in BUCKETS},
                 "na": test["accuracy"], "na_nounpp": test["constructions"].get("nounpp", {}).get("accuracy"),
                 "nounpp_SP": test["groups"].get("nounpp/SP", {}).get("accuracy"),
                 "simple": test["constructions"].get("simple", {}).get("accuracy"),
                 "adv": test["constructions"].get("adv", {}).get("accuracy"),
                 "blimp": test.get("blimp", {}).get("accuracy"),
                 "blimp_det": _pooled(test.get("blimp", {}).get("phenomena", {}),
                                      [k for k in test.get("blimp", {}).get("phenomena", {})
                                       if k.startswith("determiner_noun")])},
    }


def _run_arm(params, args, name: str, arm: str, core: str, mods: dict, seed: int, work: Path) -> dict:
    """Train (or reuse) one arm at one seed and evaluate it."""
    margin, other_number = ARMS[core]
    arm_params, text_dir = _arm(params, margin, other_number, work, mods.get("stack", 0.0))
    if core in WIKI_ARMS:
        arm_params, text_dir = _wiki_text(arm_params, name, work, args.wiki_vocab)
    arm_params = arm_params.model_copy(  # the attractor weight and the number objective are their arms' alone
        update={"train": arm_params.train.model_copy(update={
            "attractor_weight": mods.get("attr", 1.0), "number_loss": mods.get("num", 0.0),
            "noun_weight": mods.get("noun", 0.0), "seed": seed,
            **({"epochs": args.epochs} if args.epochs else {})}),
        "model": arm_params.model.model_copy(update={"lstm_bias": mods.get("bias", params.model.lstm_bias)})})
    pipeline_text = Path(params.syntax.out if params.syntax.enabled else params.augment.out)
    if arm_params.train == params.train and arm_params.model == params.model and text_dir == pipeline_text \
            and not args.retrain \
            and Path(f"metrics/train_{name}.json").is_file() and _pipeline_current(name):
        print(f"[{arm}] the pipeline's models/{name}", flush=True)
        model_dir, summary = Path("models") / name, json.loads(Path(f"metrics/train_{name}.json").read_text())
    else:
        paths = Paths.scratch(arm_params, text_dir / f"train_{name}.txt", work)
        if not (args.reuse and paths.metrics.is_file() and (paths.model_dir / "model.safetensors").is_file()):
            print(f"[{arm} seed {seed}] training {name} on {paths.train_text} (agreement_loss "
                  f"{arm_params.train.agreement_loss})", flush=True)
            train(arm_params, name, paths, quiet=False)
        model_dir, summary = paths.model_dir, json.loads(paths.metrics.read_text())
    work.mkdir(parents=True, exist_ok=True)
    return {**_evaluate(params, model_dir, summary, work), "text": str(text_dir / f"train_{name}.txt"),
            "epochs": arm_params.train.epochs}


def _pipeline_current(name: str) -> bool:
    """Whether ``dvc status`` finds the pipeline's ``train_<name>`` stage and those before it up to date with
    params.yaml and their inputs (else the pipeline's model was trained with other settings: the arm trains)."""
    import subprocess

    try:
        r = subprocess.run(["dvc", "status", "--json", "--with-deps", f"train_{name}"], capture_output=True,
                           text=True, timeout=300)
        return r.returncode == 0 and json.loads(r.stdout or "{}") == {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False


def _mean(runs: list[dict]):
    """Field-wise mean of the runs' results; an ``[accuracy, n]`` pair keeps its n; text stays the first's."""
    first = runs[0]
    if all(r == first for r in runs):
        return first
    if isinstance(first, dict):
        return {k: _mean([r[k] for r in runs]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_mean([r[0] for r in runs]), first[1]]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(r is not None for r in runs):
        return sum(runs) / len(runs)
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="large", help="model size (prepare.sizes key)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    ap.add_argument("--out", default="reports/studies/agreement_levers")
    ap.add_argument("--work", default="runs/agreement_levers", help="scratch folder for the arms' models")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--retrain", action="store_true", help="train every arm (default: reuse the pipeline's model)")
    ap.add_argument("--reuse", action="store_true", help="take the models a previous run left in --work")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for training (0: train.threads)")
    ap.add_argument("--wiki-vocab", type=int, default=24000, help="vocabulary size of the +wiki arms")
    ap.add_argument("--seeds", default="", help="comma-separated training seeds of every arm (default: train.seed); "
                    "a model's run-to-run spread is as large as some levers' effects: the table shows each arm's "
                    "mean over its seeds")
    ap.add_argument("--epochs", type=int, default=0,
                    help="a training budget for every arm, in epochs of its own text (0: train.epochs); the "
                         "learning-rate schedule ends with it")
    args = ap.parse_args()
    params = load_params(args.params)
    if args.threads:  # a speed setting: under a busy CPU one thread avoids OpenMP spin-waits
        params = params.model_copy(update={"train": params.train.model_copy(update={"threads": args.threads})})
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or [params.train.seed]
    name, out = args.model, Path(args.out)
    results = {}
    for arm in args.arms.split(","):
        core, mods = parse_arm(arm)
        runs = {}
        for seed in seeds:
            suffix = "" if seed == params.train.seed else f"_s{seed}"
            work = Path(args.work) / f"{name}_{arm.replace('+', '_')}{suffix}"
            runs[seed] = _run_arm(params, args, name, arm, core, mods, seed, work)
        results[arm] = {**_mean(list(runs.values())), "seeds": {str(k): v for k, v in runs.items()}}
        print(json.dumps({arm: results[arm]}), flush=True)
    _write(results, name, params, out)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _write(results: dict, name: str, params, out: Path, command: str | None = None) -> None:
    import datetime

    from agreelens.tracking import git_commit

    out.mkdir(parents=True, exist_ok=True)
    command = command or "python " + " ".join(sys.argv)
    commit = git_commit()[:7]
    made = f"Made by `{command}` on {datetime.date.today().isoformat()} at commit {commit}."
    (out / "agreement_levers.json").write_text(json.dumps({"model": name, "arms": results}, indent=2) + "\n")
    epochs = sorted({r.get("epochs", params.train.epochs) for r in results.values()})
    seeds = sorted({int(k) for r in results.values() for k in r.get("seeds", {})}) or [params.train.seed]
    lines = [made, "", f"The {name} model under each training lever, same corpus, epochs "
             f"({', '.join(map(str, epochs))}) and training seeds ({', '.join(map(str, seeds))}). "
             "**Dev** chose (natural-text dev items with >= 1 attractor, NA dev lexicon); **test** reports "
             "(natural test by attractor count, NA test lexicon, BLiMP). Dev nouns: a noun after this/these/those in "
             "the checker benchmark's dev sentences, written form vs its number swap. Accuracy in %, n items in "
             "brackets.", "",
             "| arm | seeds | valid PPL | tokens seen (M) | train min | tokens/s | dev natural >=1 attr. | dev natural 0 | dev 2+ | dev NA nounpp "
             "| dev nouns | test natural 0 | 1 | 2+ | test NA | nounpp | nounpp SP | simple | adv | BLiMP | BLiMP det-noun |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, r in results.items():
        d, t = r["dev"], r["test"]
        nat = " | ".join(f"{_pct(t['natural'][b][0])} ({t['natural'][b][1]})" for b in BUCKETS)
        seen = f"{r['tokens_seen'] / 1e6:.1f}" if r.get("tokens_seen") else "-"
        tps = f"{r['tokens_per_second']:.0f}" if r.get("tokens_per_second") else "-"
        lines.append(f"| {arm} | {len(r.get('seeds', {})) or 1} | {r['valid_ppl']:.1f} | {seen} | {r['train_seconds'] / 60:.1f} | {tps} | "
                     f"**{_pct(d['natural_attr'][0])}** ({d['natural_attr'][1]}) | {_pct(d['natural_0'][0])} | "
                     f"{_pct(d.get('natural_2+', [None])[0])} | "
                     f"{_pct(d['na_nounpp'])} | {_pct(d.get('nouns', [None])[0])} ({d.get('nouns', [0, 0])[1]}) | "
                     f"{nat} | {_pct(t['na'])} | {_pct(t['na_nounpp'])} | "
                     f"{_pct(t['nounpp_SP'])} | {_pct(t['simple'])} | {_pct(t['adv'])} | {_pct(t['blimp'])} | "
                     f"{_pct(t.get('blimp_det', [None])[0])} |")
    if any(len(r.get("seeds", {})) > 1 for r in results.values()):
        lines += ["", "Each arm's row is its mean over the seeds; per seed (dev only):", "",
                  "| arm | seed | valid PPL | dev natural >=1 attr. | dev natural 0 | dev 2+ | dev nouns |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for arm, r in results.items():
            for seed, x in r.get("seeds", {}).items():
                d = x["dev"]
                lines.append(f"| {arm} | {seed} | {x['valid_ppl']:.1f} | {_pct(d['natural_attr'][0])} | "
                             f"{_pct(d['natural_0'][0])} | {_pct(d['natural_2+'][0])} | "
                             f"{_pct(d.get('nouns', [None])[0])} |")
    if any(parse_arm(a)[0] in WIKI_ARMS for a in results):
        lines += ["", "The +wiki arms have their own vocabulary (`--wiki-vocab` words) and validation split (which "
                  "holds WikiText-2's): their PPL is not comparable with the others', and fewer natural items have an "
                  "out-of-vocabulary verb, so a few more are scored. Training minutes and tokens/s are as each run "
                  "recorded them on a shared 2-core machine (`--threads`)."]
    (out / "agreement_levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, r in results.items():
        nat = r["test"]["natural"]
        ax.plot(BUCKETS, [100 * nat[b][0] for b in BUCKETS], marker="o", label=arm)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 100)
    ax.set_xlabel("attractors between subject and verb")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{name}: natural test sentences by training lever")
    ax.legend(fontsize=8)
    save_figure(fig, out / "agreement_levers.png")


if __name__ == "__main__":
    main()
