"""Augmentation throughput: agreelens' batched fill vs ``transformers.pipeline("fill-mask")`` called one
sentence at a time, on the same masked LM (MiniLM-L6 from PyPI with its MLM head) and the same masked
sentences (the same masks chosen by the same seed).

- ours: ``agreelens.augment.augment``: 128 masked sentences per forward pass, candidates filtered on
  tensors (whole words, not the original, agreement-safe), one kept at random.
- baseline: ``pipeline("fill-mask", top_k=...)`` per sentence, then the same filter in Python and a
  random pick.

Usage: python bench/augment_throughput.py [--sentences 400] [--threads 2]
Last line: RESULT augment_throughput ratio=<ours/baseline> ours=<x> baseline=<y> sentences/s
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreelens.augment import AugmentConfig, _WORD, agreement_words, augment, choose_masks, load_mlm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=400)
    ap.add_argument("--baseline-sentences", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", default="prepared/train_small.txt", help="one tokenized sentence a line")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import pipeline

    model, tok = load_mlm()
    lines = [l.strip() for l in Path(args.corpus).read_text(encoding="utf-8").splitlines() if l.strip()]
    sents = [l for l in lines if 5 <= len(l.split()) <= 30][: args.sentences]
    vocab = {w for l in lines[:50000] for w in l.split()}
    cfg = AugmentConfig()

    t0 = time.perf_counter()
    out = augment(model, tok, sents, cfg, vocab, progress=False)
    ours = len(sents) / (time.perf_counter() - t0)

    protected = agreement_words(vocab)
    rng, pick = random.Random(cfg.seed), random.Random(cfg.seed)
    fill = pipeline("fill-mask", model=model, tokenizer=tok, device=-1, top_k=cfg.top_k + 20)
    base = sents[: args.baseline_sentences]
    t0 = time.perf_counter()
    made = 0
    for s in base:
        words = s.split()
        pos = choose_masks(words, protected, cfg, rng)
        if not pos:
            continue
        text = " ".join(tok.mask_token if i in pos else w for i, w in enumerate(words))
        res = fill(text)
        res = [res] if len(pos) == 1 else res
        new = list(words)
        for p, cands in zip(pos, res):
            ok = [c["token_str"] for c in cands if _WORD.match(c["token_str"]) and c["token_str"] != words[p]
                  and c["token_str"] not in protected][: cfg.top_k]
            if ok:
                new[p] = pick.choice(ok)
        made += 1
    baseline = len(base) / (time.perf_counter() - t0)
    print(f"ours: {len(sents)} sentences -> {len(out)} synthetic, {ours:.1f} sentences/s ({cfg.stats})")
    print(f"baseline: {len(base)} sentences, one pipeline call each: {baseline:.1f} sentences/s")
    print(f"RESULT augment_throughput ratio={ours / baseline:.1f} ours={ours:.1f} baseline={baseline:.1f} sentences/s")


if __name__ == "__main__":
    main()
