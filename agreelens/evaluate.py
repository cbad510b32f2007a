"""Evaluation: test perplexity of each model, learning-curve figure, the summary table."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from agreelens.config import Params
from agreelens.corpus import read_split
from agreelens.model import default_device, load_model
from agreelens.train import batchify, stream_perplexity


def test_perplexity(params: Params, name: str, split: str = "test") -> dict:
    torch.set_num_threads(params.train.threads or os.cpu_count() or 1)
    model, vocab = load_model(Path("models") / name, default_device())
    lines = read_split(Path(params.prepare.out) / f"{split}.txt")
    data = batchify(vocab.encode_lines(lines), params.evaluate.batch_size)
    ppl = stream_perplexity(model, data, params.train.bptt)
    return {f"{split}_ppl": round(ppl, 3), f"{split}_tokens": int(data.numel())}


def evaluate(params: Params, out: str | Path = "metrics/eval.json",
             figure: str | Path = "reports/figures/learning_curves.png") -> dict:
    results = {}
    for name in params.model_names:
        results[name] = test_perplexity(params, name)
        train_metrics = Path("metrics") / f"train_{name}.json"
        if train_metrics.is_file():
            t = json.loads(train_metrics.read_text())
            results[name].update({k: t[k] for k in ("best_valid_ppl", "train_tokens", "train_seconds", "epochs")})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot_learning_curves(params.model_names, figure)
    return results


def read_curve(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if v else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def plot_learning_curves(names: list[str], figure: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        path = Path("plots") / f"learning_{name}.csv"
        if not path.is_file():
            continue
        rows = read_curve(path)
        ax[0].plot([r["tokens"] / 1e6 for r in rows], [r["valid_ppl"] for r in rows], marker="o", label=f"{name} valid")
        ax[0].plot([r["tokens"] / 1e6 for r in rows], [r["train_ppl"] for r in rows], ls="--", label=f"{name} train")
        ax[1].plot([r["seconds"] / 60 for r in rows], [r["valid_ppl"] for r in rows], marker="o", label=name)
    ax[0].set(xlabel="tokens seen (M)", ylabel="perplexity", yscale="log", title="Learning curves")
    ax[1].set(xlabel="training time (min)", ylabel="valid perplexity", yscale="log", title="Validation PPL vs time")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    figure = Path(figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    return figure
