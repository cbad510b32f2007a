"""Training throughput: agreelens' trainer vs a minimal pytorch/examples word_language_model loop.

Both train the default profile's model size (embedding, hidden, layers), batch, bptt and thread count
on the same prepared corpus, for the same number of updates, timed on the update steps alone.

- ours: ``agreelens.train.train`` with the default profile (adaptive softmax, Adam, hidden-state
  carry-over, clipping, checkpoints off the timed path except every ``checkpoint_every`` steps).
- baseline: the loop of pytorch/examples ``main.py``: same LSTM, full softmax decoder +
  ``log_softmax`` + ``NLLLoss``, manual SGD update, ``repackage_hidden``.
- also printed: the baseline loop with our decoder and precision (isolates the trainer's own overhead),
  and with ``--sweep`` the reference loop over softmax x precision x batch size.

Usage: python bench/train_throughput.py [--steps 150] [--params params.yaml]
Needs data/ (``agreelens data``). Last line: RESULT train_throughput ratio=... ours=... baseline=... tok/s
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agreelens.config import load_params  # noqa: E402
from agreelens.corpus import prepare, read_split  # noqa: E402
from agreelens.model import RNNModel  # noqa: E402
from agreelens.train import Paths, autocast_dtype, batchify, train  # noqa: E402
from agreelens.vocab import Vocab  # noqa: E402


def reference_loop(model: RNNModel, data: torch.Tensor, bptt: int, steps: int, lr: float = 20.0, clip: float = 0.25,
                   bf16: bool = False):
    """pytorch/examples word_language_model/main.py train(), unchanged in substance (``bf16``: the same
    loop under CPU autocast, for the speed sweep)."""
    criterion = nn.NLLLoss()
    model.train()
    hidden = model.init_hidden(data.size(1))
    ntokens = model.vocab_size
    timed, tokens = 0.0, 0
    for step, i in enumerate(range(0, data.size(0) - 1, bptt)):
        if step >= steps:
            break
        t0 = time.perf_counter()
        seq_len = min(bptt, len(data) - 1 - i)
        x, y = data[i : i + seq_len], data[i + 1 : i + 1 + seq_len].reshape(-1)
        hidden = tuple(h.detach() for h in hidden)  # repackage_hidden
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features, hidden = model(x, hidden)
            if isinstance(model.decoder, nn.Linear):
                output = torch.log_softmax(model.decoder(features).view(-1, ntokens).float(), dim=1)
                loss = criterion(output, y)
            else:
                loss = model.loss(features, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        if step >= 5:  # warm-up steps are not timed
            timed += time.perf_counter() - t0
            tokens += y.numel()
    return tokens / timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--sweep", action="store_true",
                    help="also time the reference loop over softmax x precision x batch (what makes CPU training fast)")
    args = ap.parse_args()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    work = Path(tempfile.mkdtemp(prefix="agreelens-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    params = load_params(args.params, "default")
    params.data.root = str((ROOT / params.data.root).resolve())
    params.prepare.out = str(work / "prepared")
    params.train.max_steps = args.steps
    params.train.evals_per_epoch = 1
    threads = params.train.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    prepare(params, metrics_path=work / "prepare.json")

    m, t = params.model, params.train
    print(f"model {m.emb_size}x{m.hidden_size}x{m.layers}, vocab {params.prepare.max_vocab}, batch {t.batch_size}, "
          f"bptt {t.bptt}, threads {threads}, {args.steps} updates", flush=True)

    paths = Paths(prepared=work / "prepared", train_text=work / "prepared" / "train_large.txt", model_dir=work / "models" / "large",
                  checkpoint=work / "ckpt" / "last.pt", metrics=work / "train.json", curve=work / "curve.csv")
    ours = train(params, "large", paths=paths, quiet=True)["tokens_per_second"]

    vocab = Vocab.load(work / "prepared" / "vocab.txt")
    data = batchify(vocab.encode_lines(read_split(work / "prepared" / "train_large.txt")), t.batch_size)
    torch.manual_seed(0)
    full = RNNModel(len(vocab), m.model_copy(update={"softmax": "full"}))
    baseline = reference_loop(full, data, t.bptt, args.steps + 5)
    torch.manual_seed(0)
    same = RNNModel(len(vocab), m)
    ours_bf16 = t.amp and autocast_dtype(torch.device("cpu")) is not None
    same_arch = reference_loop(same, data, t.bptt, args.steps + 5, bf16=ours_bf16)

    if args.sweep:
        print("speed sweep (reference loop, 60 updates each):")
        for softmax in ("full", "adaptive"):
            for bf16 in (False, True):
                for batch in (32, 64, 128):
                    torch.manual_seed(0)
                    mdl = RNNModel(len(vocab), m.model_copy(update={"softmax": softmax}))
                    d = batchify(vocab.encode_lines(read_split(work / "prepared" / "train_large.txt")), batch)
                    rate = reference_loop(mdl, d, t.bptt, 65, bf16=bf16)
                    print(f"  softmax {softmax:8s} {'bf16' if bf16 else 'fp32'} batch {batch:3d}: {rate:8,.0f} tok/s", flush=True)
    print(f"reference loop, full softmax (pytorch/examples): {baseline:,.0f} tok/s")
    print(f"reference loop, our decoder{' + bf16' if ours_bf16 else ''}:         {same_arch:,.0f} tok/s (trainer overhead: "
          f"{ours / same_arch:.2f}x)")
    print(f"agreelens trainer (default profile):             {ours:,.0f} tok/s")
    print(f"RESULT train_throughput ratio={ours / baseline:.2f} ours={ours:.0f} baseline={baseline:.0f} tok/s")


if __name__ == "__main__":
    main()
