"""Evaluation: test perplexity of each model, learning-curve figure, the summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from agreelens.config import Params
from agreelens.corpus import read_split
from agreelens.model import default_device, load_model
from agreelens.plots import plot_learning_curves
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
