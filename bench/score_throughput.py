"""Minimal-pair scoring throughput: agreelens' batched scorer vs a one-sentence-at-a-time loop.

Both score the NA-task stimuli (all seven constructions, ``--n-per-condition`` pairs per condition)
with the one-prefix method on the same model:

- ours: ``agreelens.scoring.pair_margins``: the LSTM steps once per node of the prefix trie (shared
  beginnings such as "<eos> the boy" run once), a depth per batch, and the margin of the two verb
  forms is read at the last prefix position with ``RNNModel.target_margin`` (two logits; the softmax
  normalisers cancel).
- baseline: for each pair, forward ``<eos> + prefix`` of the good sentence alone, take the full
  log-softmax at its last position and read the good verb; the same again for the bad sentence.

The model is a random ``RNNModel`` (embedding/hidden 256, 2 layers, adaptive softmax, 20000 words that
include every stimuli word, scattered over the head and tail clusters) or, with ``--model DIR``, a
trained one. Per-pair correctness of both must agree. The baseline loop runs on ``--pairs`` pairs
(spread over all conditions); rates are pairs per second, best of ``--repeats``.

Usage: python bench/score_throughput.py [--model DIR] [--pairs 400] [--threads 1]
Last line: RESULT score_throughput ratio=<ours/baseline> ours=<x> baseline=<y> pairs/s
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agreelens.config import ModelConfig  # noqa: E402
from agreelens.model import RNNModel, load_model  # noqa: E402
from agreelens.scoring import pair_margins, read_pairs  # noqa: E402
from agreelens.stimuli import POOLS, StimuliConfig, generate, write  # noqa: E402
from agreelens.text import tokenize  # noqa: E402
from agreelens.vocab import EOS, UNK, Vocab  # noqa: E402


def random_model(vocab_size: int, seed: int) -> tuple[RNNModel, Vocab]:
    cfg = StimuliConfig()
    words = {"the", "and"}
    for pool in POOLS:
        for entry in getattr(cfg, pool):
            words.update(entry if isinstance(entry, list) else [entry])
    words = sorted(words)
    filler = [f"w{i:05d}" for i in range(vocab_size - 2 - len(words))]
    rest = words + filler
    random.Random(seed).shuffle(rest)  # stimuli words land in the head and in both tail clusters
    vocab = Vocab([EOS, UNK, *rest])
    torch.manual_seed(seed)
    model = RNNModel(len(vocab), ModelConfig(emb_size=256, hidden_size=256, layers=2, dropout=0.0, softmax="adaptive"))
    return model.eval(), vocab


@torch.inference_mode()
def baseline(model, vocab: Vocab, pairs: list[dict], device) -> torch.Tensor:
    """log P(good) - log P(bad), each from its own unbatched forward pass and full log-softmax."""
    model.eval()
    out = []
    for p in pairs:
        lp = []
        for sentence, word in ((p["sentence_good"], p["one_prefix_word_good"]),
                               (p["sentence_bad"], p["one_prefix_word_bad"])):
            toks = tokenize(sentence)
            pos = len(tokenize(p["one_prefix_prefix"]))  # the verb's position in the sentence
            assert toks[pos] == tokenize(word)[0]
            ids = torch.tensor([vocab.eos, *vocab.encode(toks[:pos])], device=device).unsqueeze(1)
            features, _ = model(ids)
            logp = model.log_probs(features[-1])[0]  # full next-word distribution
            lp.append(logp[vocab.stoi[toks[pos]]].item())
        out.append(lp[0] - lp[1])
    return torch.tensor(out, dtype=torch.float64)


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained model directory (default: a random 256x2 adaptive-softmax model)")
    ap.add_argument("--vocab-size", type=int, default=20000, help="size of the random model's vocabulary")
    ap.add_argument("--n-per-condition", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=400, help="pairs scored by the baseline loop")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model:
        model, vocab = load_model(args.model, device)
        desc = f"{args.model} ({model.cfg.softmax} softmax, {len(vocab)} words)"
    else:
        model, vocab = random_model(args.vocab_size, args.seed)
        model.to(device)
        desc = f"random RNNModel 256x2, adaptive softmax, {len(vocab)} words"

    records, report = generate(StimuliConfig(n_per_condition=args.n_per_condition), vocab)
    dropped = sum(len(v) for v in report.get("dropped", {}).values())
    with tempfile.TemporaryDirectory(prefix="agreelens-score-bench-") as tmp:
        paths = write(records, Path(tmp) / "na")
        pairs = read_pairs(sorted(p for p in paths if p.suffix == ".jsonl"))
    step = max(1, len(pairs) // max(1, args.pairs))
    subset_idx = list(range(0, len(pairs), step))[: args.pairs]
    subset = [pairs[i] for i in subset_idx]

    print(f"model: {desc}; device {device}, {torch.get_num_threads()} thread(s)")
    print(f"pairs: {len(pairs)} ({len(report['counts'])} constructions, {dropped} pool entries out of vocabulary)")

    pair_margins(model, vocab, pairs[:8], batch_size=args.batch_size, method="prefix")  # warm-up
    t_ours, (margins, scored) = best_time(
        lambda: pair_margins(model, vocab, pairs, batch_size=args.batch_size, method="prefix"), args.repeats
    )
    baseline(model, vocab, subset[:4], device)  # warm-up
    t_base, base = best_time(lambda: baseline(model, vocab, subset, device), args.repeats)

    ours_rate, base_rate = len(pairs) / t_ours, len(subset) / t_base
    mine = margins[torch.tensor(subset_idx)]
    diff = (mine - base).abs().max().item()
    agree = int(((mine > 0) == (base > 0)).sum())
    print(f"ours:     {len(pairs)} pairs in {t_ours:.3f} s  ({ours_rate:.1f} pairs/s, batch {args.batch_size})")
    print(f"baseline: {len(subset)} pairs in {t_base:.3f} s  ({base_rate:.1f} pairs/s, one sentence at a time)")
    print(f"accuracy (random models score near chance): {float(((margins > 0) & scored).sum()) / max(1, int(scored.sum())):.3f}")
    print(f"agreement on the baseline's {len(subset)} pairs: {agree}/{len(subset)} same correctness, "
          f"max |margin difference| {diff:.2e}")
    if not bool(scored.all()) or agree != len(subset) or diff > 1e-4:
        print("ERROR: the batched scorer and the baseline disagree", file=sys.stderr)
        sys.exit(1)
    print(f"RESULT score_throughput ratio={ours_rate / base_rate:.1f} ours={ours_rate:.1f} baseline={base_rate:.1f} pairs/s")


if __name__ == "__main__":
    main()
