"""Unit-ablation sweep speed: agreelens' batched sweep vs a naive loop over units.

Both ablate single units of the same model on the same NA stimuli (all seven constructions,
``--n-per-condition`` pairs per condition, one-prefix method) and compute accuracy per
construction/condition:

- ours: ``agreelens.ablation.sweep``: every unit of both layers; ``--chunk`` ablations per pass as batch
  columns of the prefix trie; for layer-2 units, layer 1 runs once; only the two verbs' scores.
- baseline: for each unit, a deep copy of the model with the unit's outgoing weights zeroed (its column
  in weight_hh of its layer, in weight_ih of the next layer or in the decoder's inputs), re-scored with
  ``agreelens.scoring.pair_margins``. It runs on ``--units`` units spread over both layers; its rate
  is extrapolated per unit.

Per-group accuracies of the two must be identical on the units both did. The model is a random
``RNNModel`` (embedding/hidden 256, 2 layers, adaptive softmax, 20000 words including every stimuli
word, scattered over the head and tail clusters) or, with ``--model DIR``, a trained one.

Usage: python bench/sweep_speed.py [--model DIR] [--units 8] [--threads 1]
Last line: RESULT sweep_speed ratio=<ours/baseline speed-up> ours=<units/s> baseline=<units/s> units/s
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from score_throughput import random_model  # noqa: E402

from agreelens.ablation import sweep  # noqa: E402
from agreelens.model import load_model  # noqa: E402
from agreelens.scoring import pair_margins, read_pairs, summarize  # noqa: E402
from agreelens.stimuli import StimuliConfig, generate, write  # noqa: E402
from agreelens.trace import unit_to_layer_index  # noqa: E402


def zero_outgoing(model, unit: int):
    """A deep copy of ``model`` with the unit's outgoing weights set to 0."""
    rnn = model.rnn
    layer, j = unit_to_layer_index(unit, rnn.hidden_size, rnn.num_layers)
    m = copy.deepcopy(model)
    with torch.no_grad():
        getattr(m.rnn, f"weight_hh_l{layer - 1}")[:, j] = 0
        if layer < rnn.num_layers:
            getattr(m.rnn, f"weight_ih_l{layer}")[:, j] = 0
        elif isinstance(m.decoder, torch.nn.Linear):
            m.decoder.weight[:, j] = 0
        else:
            m.decoder.head.weight[:, j] = 0
            for tail in m.decoder.tail:
                tail[0].weight[:, j] = 0
    m.rnn.flatten_parameters()  # on CUDA, cuDNN would otherwise re-compact the copied weights on every call
    return m


def naive(model, vocab, pairs, units, batch_size):
    """Per unit: zero its outgoing weights in a copy and re-score every pair."""
    out = {}
    for u in units:
        margins, scored = pair_margins(zero_outgoing(model, u), vocab, pairs, batch_size=batch_size, method="prefix")
        out[u] = summarize(pairs, margins, scored)["groups"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained model directory (default: a random 256x2 adaptive-softmax model)")
    ap.add_argument("--vocab-size", type=int, default=20000, help="size of the random model's vocabulary")
    ap.add_argument("--n-per-condition", type=int, default=200)
    ap.add_argument("--units", type=int, default=8, help="units ablated by the naive loop (spread over the layers)")
    ap.add_argument("--chunk", type=int, default=32, help="ablations per pass in ours")
    ap.add_argument("--batch-size", type=int, default=256, help="pair_margins batch size in the baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # both sides in plain fp32 (cuDNN's LSTM would otherwise use TF32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.model:
        model, vocab = load_model(args.model, device)
        cfg = model.cfg
        desc = f"{args.model} ({cfg.hidden_size}x{cfg.layers}, {cfg.softmax} softmax, {len(vocab)} words)"
    else:
        model, vocab = random_model(args.vocab_size, args.seed)
        model.to(device)
        desc = f"random RNNModel 256x2, adaptive softmax, {len(vocab)} words"
    hsz, layers = model.rnn.hidden_size, model.rnn.num_layers
    n_units = hsz * layers

    records, _ = generate(StimuliConfig(n_per_condition=args.n_per_condition), vocab)
    with tempfile.TemporaryDirectory(prefix="agreelens-sweep-bench-") as tmp:
        paths = write(records, Path(tmp) / "na")
        pairs = read_pairs(sorted(p for p in paths if p.suffix == ".jsonl"))
    step = max(1, n_units // max(1, args.units))
    subset = list(range(1 + step // 2, n_units + 1, step))[: args.units]

    print(f"model: {desc}; device {device}, {torch.get_num_threads()} thread(s)")
    print(f"pairs: {len(pairs)}; ours sweeps all {n_units} units, the naive loop {len(subset)}: {subset}")

    sweep(model, vocab, pairs[:50], progress=False, chunk=args.chunk)  # warm-up
    t0 = time.perf_counter()
    ours = sweep(model, vocab, pairs, progress=False, chunk=args.chunk)
    t_ours = time.perf_counter() - t0

    naive(model, vocab, pairs[:50], subset[:1], args.batch_size)  # warm-up
    t0 = time.perf_counter()
    base = naive(model, vocab, pairs, subset, args.batch_size)
    t_base = time.perf_counter() - t0

    # compare counts of correct pairs (the sweep's drops are rounded to 0.01 points, far below 1/n)
    full = summarize(pairs, *pair_margins(model, vocab, pairs, batch_size=args.batch_size, method="prefix"))["groups"]
    keys, n = ours["conditions"], ours["n"]
    mismatches = [f"full model {k}" for k in keys
                  if round(full[k]["accuracy"] * n[k]) != round(ours["base_accuracy"][k] * n[k])]
    for u in subset:
        for k, drop in zip(keys, ours["drops"][str(u)]):
            mine = round((ours["base_accuracy"][k] - drop / 100) * n[k])
            theirs = round(base[u][k]["accuracy"] * n[k])
            if mine != theirs:
                mismatches.append(f"unit {u} {k}: ours {mine}/{n[k]} correct, baseline {theirs}/{n[k]}")
    ours_rate, base_rate = n_units / t_ours, len(subset) / t_base
    print(f"ours:     {n_units} units in {t_ours:.2f} s ({ours_rate:.2f} units/s, chunk {args.chunk})")
    print(f"baseline: {len(subset)} units in {t_base:.2f} s ({base_rate:.3f} units/s, copy + pair_margins per unit)")
    print(f"number units (>= {ours['threshold']:g} points): {[u['unit'] for u in ours['number_units']][:20]}")
    print(f"agreement: per-group accuracies of {len(subset)} units x {len(keys)} groups and the full model: "
          f"{'identical' if not mismatches else f'{len(mismatches)} mismatches'}")
    if mismatches:
        print("ERROR: the sweep and the naive loop disagree:\n  " + "\n  ".join(mismatches[:20]), file=sys.stderr)
        sys.exit(1)
    print(f"RESULT sweep_speed ratio={ours_rate / base_rate:.1f} ours={ours_rate:.2f} baseline={base_rate:.3f} units/s")


if __name__ == "__main__":
    main()
