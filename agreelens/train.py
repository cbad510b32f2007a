"""Training: truncated BPTT with hidden-state carry-over, clipping, LR schedule, early stopping,
checkpoints that survive ``kill -9`` (the same command resumes and ends bit-identical), MLflow logging,
data-parallel under ``torchrun`` (:mod:`agreelens.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agreelens import tracking
from agreelens.config import Params
from agreelens.corpus import read_split
from agreelens.distributed import World, wrap
from agreelens.model import RNNModel, device_of, evaluating, save_model
from agreelens.negatives import (attractor_flags, determiner_flags, find_verb_pairs, margin_loss, noun_pairs, number_loss,
                                 swap_table, verb_numbers)
from agreelens.plots import plot_learning_curves
from agreelens.vocab import Vocab

_CRASH_AT_STEP = int(os.environ.get("AGREELENS_CRASH_AT_STEP", "0") or 0)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """1-D id stream -> (T, B): B contiguous streams side by side (pytorch/examples)."""
    n = ids.numel() // batch_size
    if n < 2:
        raise ValueError(f"{ids.numel()} tokens are too few for batch_size {batch_size}")
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


class SentenceStream:
    """Encoded sentences; each epoch lays them out in a new seeded order, then batchifies."""

    def __init__(self, vocab: Vocab, lines: list[str]):
        ids = vocab.encode_lines(lines).numpy()
        ends = np.flatnonzero(ids == vocab.eos) + 1
        self.ids = ids
        self.starts = np.concatenate([[0], ends[:-1]])
        self.lengths = ends - self.starts
        self.tokens = int(ids.size)

    def positions(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        """Token positions of the epoch's stream: the sentences in a seeded order (as written without
        ``shuffle``); index any per-token array aligned with the ids."""
        if not shuffle:
            return np.arange(self.tokens)
        order = np.random.default_rng([seed, epoch]).permutation(len(self.starts))
        lengths = self.lengths[order]
        # gather indices for the permuted sentences without a Python loop over sentences
        offsets = np.repeat(self.starts[order] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return np.arange(self.tokens) + offsets


def stream_perplexity(model: RNNModel, data: torch.Tensor, bptt: int) -> float:
    """Perplexity of a batchified (T, B) stream with hidden-state carry-over."""
    device = device_of(model)
    hidden, total, count = None, 0.0, 0
    with evaluating(model):
        for i in range(0, data.size(0) - 1, bptt):
            seq = min(bptt, data.size(0) - 1 - i)
            x = data[i : i + seq].to(device)
            y = data[i + 1 : i + 1 + seq].to(device)
            features, hidden = model(x, hidden)
            total += -model.target_log_probs(features, y).double().sum().item()
            count += y.numel()
    return math.exp(total / max(count, 1))


@dataclass
class Paths:
    prepared: Path
    train_text: Path  # original + synthetic sentences (the augment and augment_syntax stages)
    model_dir: Path
    checkpoint: Path
    metrics: Path
    curve: Path

    @classmethod
    def scratch(cls, params: Params, train_text: str | Path, work: str | Path) -> "Paths":
        """A model trained outside the pipeline (studies, benchmarks): everything it writes under ``work``."""
        work = Path(work)
        return cls(prepared=Path(params.prepare.out), train_text=Path(train_text), model_dir=work / "model",
                   checkpoint=work / "last.pt", metrics=work / "train.json", curve=work / "curve.csv")

    @classmethod
    def for_model(cls, params: Params, name: str) -> "Paths":
        return cls(
            prepared=Path(params.prepare.out),
            train_text=Path(params.syntax.out) / f"train_{name}.txt",
            model_dir=Path("models") / name,
            checkpoint=Path("checkpoints") / name / "last.pt",
            metrics=Path("metrics") / f"train_{name}.json",
            curve=Path("plots") / f"learning_{name}.csv",
        )


def _fingerprint(params: Params, paths: Paths, name: str) -> str:
    """Identity of a run: a checkpoint from other settings, data or training code is never resumed."""
    t = params.train.model_dump(exclude={"checkpoint_every", "threads"})
    files = [paths.train_text, paths.prepared / "valid.txt", paths.prepared / "vocab.txt"]
    stamp = [(f.name, f.stat().st_size, tracking.params_hash(f.read_bytes()[:1 << 20])) for f in files]
    from agreelens.stages import code_files  # the code of the run: the train stage's code dependencies

    code = hashlib.sha1(b"".join(f.read_bytes() for f in code_files("train"))).hexdigest()[:12]
    return tracking.params_hash({"model": params.model.model_dump(), "train": t, "files": stamp, "code": code})


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill during the write leaves the previous checkpoint


def _make_optimizer(model: torch.nn.Module, params: Params):
    t = params.train
    if t.optimizer == "adam":  # fused: one kernel for all parameters (a tenth of a CPU step is Adam's otherwise)
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def _make_scheduler(opt, params: Params, total_steps: int):
    t = params.train
    if t.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=t.plateau_factor, patience=0)
    warm = max(t.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). oneDNN also "supports" bf16 on any
    AVX-512 CPU by emulating it, several times slower than fp32: that does not count here."""
    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in checks if f is not None) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 mixed precision where the hardware does bf16 natively (CUDA; CPUs with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_cpu_bf16() else None


class _Step(torch.nn.Module):
    """One training forward: features and loss in one call, so that DDP sees every parameter used
    (the decoder's too) in the graph of its output."""

    def __init__(self, model: RNNModel, swap: torch.Tensor | None = None, weight: float = 0.0, delta: float = 0.0,
                 number_weight: float = 0.0, verb_number: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.weight, self.delta, self.number_weight = weight, delta, number_weight
        self.register_buffer("swap", swap if swap is not None else torch.empty(0, dtype=torch.long), persistent=False)
        # the subject-number objective's readout: logit of "singular" from the features that predict a verb
        self.number_head = torch.nn.Linear(model.decoder.in_features, 1) if number_weight else None
        self.register_buffer("verb_number", verb_number if verb_number is not None else torch.empty(0, dtype=torch.int8),
                             persistent=False)

    def forward(self, x: torch.Tensor, hidden, y: torch.Tensor, w: torch.Tensor | None = None):
        """-> (loss to minimise, the LM loss alone, hidden); ``w``: the margin term's weight per target"""
        features, hidden = self.model(x, hidden)
        lm = self.model.loss(features, y)
        loss = lm
        if self.weight:
            loss = loss + self.weight * margin_loss(self.model, features, y, self.swap, self.delta, w)
        if self.number_head is not None:
            loss = loss + self.number_weight * number_loss(self.number_head, features, y, self.verb_number, w)
        return loss, lm, hidden


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(params: Params, name: str, paths: Paths | None = None, quiet: bool = False) -> dict:
    """Train model ``name`` (a key of ``prepare.sizes``); resume from its checkpoint if one matches.
    Under ``torchrun``, one data-parallel rank of the job (rank 0 writes everything)."""
    if name not in params.prepare.sizes:
        raise ValueError(f"unknown model '{name}': params.yaml prepare.sizes defines {list(params.prepare.sizes)}")
    world = World.from_env()
    try:
        return _train(params, name, paths, quiet or not world.main, world)
    finally:
        world.close()


def _train(params: Params, name: str, paths: Paths | None, quiet: bool, world: World) -> dict:
    t = params.train
    paths = paths or Paths.for_model(params, name)
    torch.set_num_threads(world.threads(t.threads))
    device = world.device
    amp_dtype = autocast_dtype(device) if t.amp else None

    vocab = Vocab.load(paths.prepared / "vocab.txt")
    if not paths.train_text.is_file():
        raise FileNotFoundError(f"{paths.train_text}: training text missing; run `agreelens augment-syntax` "
                                "(it writes the original text alone when augment.enabled is false) or `dvc repro`")
    lines = read_split(paths.train_text)
    stream = SentenceStream(vocab, lines)
    valid = batchify(vocab.encode_lines(read_split(paths.prepared / "valid.txt")), 16)
    steps_per_epoch = (stream.tokens // t.batch_size - 1) // t.bptt
    if steps_per_epoch < 1:
        raise ValueError(f"train_{name}: {stream.tokens} tokens are too few for batch {t.batch_size} x bptt {t.bptt}")
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    eval_every = max(1, steps_per_epoch // t.evals_per_epoch)

    na_pairs = _na_pairs(t.na_stimuli, t.na_natural)
    _seed_all(t.seed)
    model = RNNModel(len(vocab), params.model).to(device)
    if world.distributed:  # same initial weights everywhere; dropout masks of their own
        torch.manual_seed(t.seed + 7919 * world.rank)
    swap, pairs, weights, counts = _agreement_swap(params, vocab, lines, stream, quiet)
    del lines
    step = _Step(model, swap, t.agreement_loss, t.agreement_margin, t.number_loss,
                 verb_numbers(swap, vocab, pairs) if t.number_loss else None).to(device)
    step_fn = wrap(step, world, unused=params.model.softmax == "adaptive")
    opt = _make_optimizer(step, params)  # the model's parameters, then the number readout's (if any)
    sched = _make_scheduler(opt, params, total_steps)
    fingerprint = _fingerprint(params, paths, name)
    st = {"epoch": 0, "epoch_step": 0, "step": 0, "best_valid_ppl": float("inf"), "bad_evals": 0,
          "history": [], "seconds": 0.0, "run_id": None, "stopped_early": False,
          "window_loss": 0.0, "window_tokens": 0}  # training loss since the last evaluation
    hidden, best_state = None, None

    if paths.checkpoint.is_file():
        ckpt = torch.load(paths.checkpoint, map_location="cpu", weights_only=True)  # load_state_dict moves to the device
        if ckpt.get("fingerprint") == fingerprint:
            model.load_state_dict(ckpt["model"])
            if step.number_head is not None:
                step.number_head.load_state_dict(ckpt["number_head"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            st.update(ckpt["state"])
            if not world.main:  # the checkpoint's loss window holds every rank's sum: count it once
                st["window_loss"], st["window_tokens"] = 0.0, 0
            hidden = (tuple(world.shard(h).to(device) for h in ckpt["hidden"])
                      if ckpt["hidden"] is not None else None)
            best_state = ckpt["best_model"]
            ranks = ckpt["rng"].get("ranks")
            if world.distributed and (ranks is None or len(ranks) != world.size):
                torch.manual_seed(t.seed + 7919 * world.rank + st["step"])  # other world size: fresh streams
            else:
                rng = ranks[world.rank] if world.distributed else ckpt["rng"]
                torch.set_rng_state(rng["torch"].cpu())  # map_location moved it; RNG states live on the CPU
                if device.type == "cuda" and rng.get("cuda") is not None:
                    torch.cuda.set_rng_state(rng["cuda"].cpu())
            if not quiet:
                print(f"[train {name}] resuming from {paths.checkpoint} at step {st['step']}")
        elif not quiet:
            print(f"[train {name}] ignoring {paths.checkpoint}: made with other settings or data")

    mlflow_params = {**tracking.flatten({"model": params.model.model_dump(), "train": t.model_dump()}),
                     "data.corpora": ",".join(params.data.corpora), "model_name": name,
                     "train_tokens": stream.tokens, "vocab_size": len(vocab), "profile": params.profile}
    tags = {"git_commit": tracking.git_commit(), "data_dvc_md5": tracking.dvc_hash(),
            "params_hash": tracking.params_hash(mlflow_params), "agreelens.model": name}

    def checkpoint() -> None:
        """Every rank takes part (hidden state and RNG streams are gathered); rank 0 writes."""
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        ranks = world.gather(rng)
        full = None if hidden is None else tuple(world.gather_columns(h.detach()) for h in hidden)
        window = world.sum(st["window_loss"], st["window_tokens"])
        if not world.main:
            return
        if world.distributed:
            rng = {**rng, "ranks": ranks}
        _save_checkpoint(paths.checkpoint, {
            "fingerprint": fingerprint, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": rng, "best_model": best_state, "hidden": full,
            "state": {**st, "window_loss": window[0], "window_tokens": int(window[1])},
            **({"number_head": step.number_head.state_dict()} if step.number_head is not None else {})})

    mlflow = (tracking.mlflow_run("agreelens-train", f"train-{name}", mlflow_params, tags, st["run_id"])
              if world.main else nullcontext(tracking.Run(None)))
    with mlflow as run:
        st["run_id"] = run.id
        model.train()
        bar = tqdm(total=total_steps, initial=st["step"], desc=f"train {name}", unit="step",
                   disable=quiet, dynamic_ncols=True, mininterval=1.0)
        done = st["step"] >= total_steps or st["stopped_early"]
        t0 = time.perf_counter()
        while not done and st["epoch"] < t.epochs:
            order = stream.positions(t.seed, st["epoch"], t.shuffle)
            data = world.shard(batchify(torch.from_numpy(stream.ids[order]), t.batch_size))
            wdata = None if weights is None else world.shard(batchify(torch.from_numpy(weights[order]), t.batch_size))
            if hidden is None:
                hidden = model.init_hidden(data.size(1))
            for i in range(st["epoch_step"], steps_per_epoch):
                x = data[i * t.bptt : (i + 1) * t.bptt].to(device, non_blocking=True)
                y = data[i * t.bptt + 1 : (i + 1) * t.bptt + 1].to(device, non_blocking=True)
                hidden = tuple(h.detach() for h in hidden)
                with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                    w = None if wdata is None else wdata[i * t.bptt + 1 : (i + 1) * t.bptt + 1].to(device)
                    loss, lm_loss, hidden = step_fn(x, hidden, y, w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
                opt.step()
                if t.schedule == "cosine":
                    sched.step()
                st["step"] += 1
                st["epoch_step"] = i + 1
                st["window_loss"] += lm_loss.item() * y.numel()
                st["window_tokens"] += y.numel()
                now = time.perf_counter()
                st["seconds"] += now - t0
                t0 = now
                bar.update(1)
                if st["step"] % 20 == 0 or i + 1 == steps_per_epoch:
                    rate = bar.format_dict.get("rate") or 0.0  # steps/s, smoothed by tqdm
                    avg = st["window_loss"] / st["window_tokens"]
                    bar.set_postfix(epoch=st["epoch"] + 1, loss=f"{avg:.3f}", ppl=f"{math.exp(min(avg, 50)):.1f}",
                                    tok_s=f"{rate * y.numel():.0f}")
                last = (i + 1 == steps_per_epoch) or st["step"] >= total_steps
                if (i + 1) % eval_every == 0 or last:
                    window_loss, window_tokens = world.sum(st["window_loss"], st["window_tokens"])
                    vppl = stream_perplexity(model, valid, t.bptt) if world.main else None
                    vppl = world.broadcast(vppl)  # rank 0 evaluates; all ranks schedule and stop alike
                    t0 = time.perf_counter()
                    train_ppl = math.exp(min(window_loss / max(window_tokens, 1), 50))
                    st["window_loss"], st["window_tokens"] = 0.0, 0
                    if world.main:
                        point = {"step": st["step"], "epoch": round(st["step"] / steps_per_epoch, 3),
                                 "tokens": st["step"] * t.batch_size * t.bptt, "train_ppl": round(train_ppl, 3),
                                 "valid_ppl": round(vppl, 3), "lr": opt.param_groups[0]["lr"],
                                 "seconds": round(st["seconds"], 1)}
                        if na_pairs:
                            point.update(na_accuracy(model, vocab, na_pairs))
                        st["history"].append(point)
                        run.log_metrics({k: v for k, v in point.items() if k not in ("step", "tokens", "seconds")},
                                        step=st["step"])
                        if not quiet:
                            na = (f", NA {point['na_accuracy']:.1%} (nounpp {point['na_nounpp']:.1%})"
                                  if na_pairs else "")
                            if "natural_attr" in point:
                                na += f", natural >=1 attractor {point['natural_attr']:.1%}"
                            bar.write(f"[train {name}] step {st['step']} epoch {point['epoch']:.2f}: "
                                      f"train ppl {train_ppl:.1f}, valid ppl {vppl:.1f}{na}")
                    if vppl < st["best_valid_ppl"]:
                        st["best_valid_ppl"], st["bad_evals"] = vppl, 0
                        if world.main:
                            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    else:
                        st["bad_evals"] += 1
                    if t.schedule == "plateau":
                        sched.step(vppl)
                    if st["bad_evals"] >= t.patience:
                        st["stopped_early"] = True
                if st["step"] >= total_steps or st["stopped_early"]:
                    done = True
                if st["step"] % t.checkpoint_every == 0 or done:
                    checkpoint()
                if st["step"] == _CRASH_AT_STEP:  # fault injection for the resume test: a real SIGKILL
                    os.kill(os.getpid(), signal.SIGKILL)
                if done:
                    break
            else:
                st["epoch"] += 1
                st["epoch_step"] = 0
        bar.close()

        if best_state is not None:
            model.load_state_dict(best_state)
        if world.distributed:
            st["seconds"] = max(world.gather(st["seconds"]))
        summary = {"model": name, "best_valid_ppl": round(st["best_valid_ppl"], 3), "steps": st["step"],
                   "epochs": round(st["step"] / steps_per_epoch, 3), "train_tokens": stream.tokens,
                   "tokens_seen": st["step"] * t.batch_size * t.bptt, "train_seconds": round(st["seconds"], 1),
                   "tokens_per_second": round(st["step"] * t.batch_size * t.bptt / max(st["seconds"], 1e-9)),
                   "stopped_early": st["stopped_early"], "device": device.type, "profile": params.profile}
        if world.distributed:
            summary["processes"] = world.size
        summary.update(counts)
        if not world.main:
            return summary
        save_model(model.cpu(), vocab, paths.model_dir, extra={"name": name, "train": summary})
        write_curve(paths.curve, st["history"])
        figure = plot_learning_curves([name], paths.curve.with_suffix(".png"), curves={name: paths.curve})
        paths.metrics.parent.mkdir(parents=True, exist_ok=True)
        paths.metrics.write_text(json.dumps(summary, indent=2) + "\n")
        run.log_metrics({"best_valid_ppl": summary["best_valid_ppl"], "tokens_per_second": summary["tokens_per_second"]})
        run.log_artifact(paths.curve)
        run.log_artifact(figure)
    paths.checkpoint.unlink(missing_ok=True)
    return summary


def _agreement_swap(params: Params, vocab: Vocab, lines: list[str], stream: SentenceStream,
                    quiet: bool) -> tuple[torch.Tensor | None, list[tuple[str, str]], np.ndarray | None, dict]:
    """The number-swap table of the agreement losses over the training ``lines`` (None when neither
    ``train.agreement_loss`` nor ``train.number_loss`` is on), its verb pairs, and the agreement terms' weight
    at each token of ``stream`` (None unless ``train.attractor_weight`` differs from 1 or ``train.noun_weight``
    is on), and counts for the summary. With ``train.noun_weight`` the table also swaps nouns, weighted only
    right after a determiner."""
    t = params.train
    if not (t.agreement_loss or t.number_loss):
        return None, [], None, {}
    pairs = find_verb_pairs(lines, vocab)
    exclude = [w for pair in params.stimuli.verbs for w in pair]  # NA-task verbs (dev and test) are never in the loss
    table = swap_table(pairs, vocab, exclude)
    n = int((table >= 0).sum()) // 2
    counts = {"agreement_pairs": n}
    weights = None
    if t.attractor_weight != 1.0:
        flags = attractor_flags(stream.ids, vocab, pairs, table)
        weights = np.where(flags, np.float32(t.attractor_weight), np.float32(1.0))
    verbs = int((table.numpy()[stream.ids] >= 0).sum()) if weights is not None and not quiet else 0  # before nouns join
    if t.noun_weight and t.agreement_loss:
        held = [w for pool in ("nouns", "location_nouns") for e in getattr(params.stimuli, pool) for w in e]
        nouns = noun_pairs(vocab, pairs, held)  # the NA task's nouns (dev and test) are never in the loss either
        noun_table = swap_table(nouns, vocab)
        is_noun = noun_table.numpy()[stream.ids] >= 0
        at_det = determiner_flags(stream.ids, vocab, nouns)
        base = weights if weights is not None else np.ones(len(stream.ids), dtype=np.float32)
        weights = np.where(at_det, np.float32(t.noun_weight), np.where(is_noun, np.float32(0.0), base))
        table = torch.where(noun_table >= 0, noun_table, table)
        counts.update(noun_pairs=len(nouns), noun_sites=int(at_det.sum()))
    if not quiet:
        kept = [f"{s}/{p}" for s, p in pairs if table[vocab.index(s)] >= 0]
        losses = " and ".join(x for x, on in (("margin", t.agreement_loss), ("subject-number", t.number_loss)) if on)
        print(f"[train] agreement {losses} loss on {n} verb pairs"
              f" (NA-task verbs held out): {', '.join(kept[:12])}, ...")
        if t.attractor_weight != 1.0:
            print(f"[train] weight {t.attractor_weight:g} at {int(flags.sum()):,} of {verbs:,} verb tokens whose "
                  "nearest preceding noun has the other number")
        if t.noun_weight and t.agreement_loss:
            print(f"[train] margin weight {t.noun_weight:g} at {int(at_det.sum()):,} noun tokens right after a "
                  f"determiner of their number ({len(nouns):,} noun pairs, NA-task nouns held out)")
    return table, pairs, weights, counts


def _na_pairs(folder: str, natural: str = "") -> list[dict]:
    """Pairs to score at every validation (the agreement learning curve), where generated: the NA
    stimuli in ``folder`` and the natural-text items with at least one attractor in ``natural``."""
    from agreelens.scoring import read_pairs

    files = sorted(Path(folder).glob("*.jsonl")) if folder else []
    pairs = read_pairs(files) if files else []
    if natural and Path(natural).is_file():
        pairs += [p for p in read_pairs(natural) if p.get("n_attractors", 0) >= 1]
    return pairs


def _pooled(groups: list[dict]) -> float:
    n = sum(g["n"] for g in groups)
    return round(sum(g["accuracy"] * g["n"] for g in groups) / n, 4) if n else 0.0


def na_accuracy(model: RNNModel, vocab: Vocab, pairs: list[dict]) -> dict:
    from agreelens.scoring import score_pairs

    with evaluating(model):
        r = score_pairs(model, vocab, pairs, batch_size=512)
    stimuli = [g for k, g in r["groups"].items() if not k.startswith("natural_")]
    out = {"na_accuracy": _pooled(stimuli), "na_nounpp": _pooled([g for k, g in r["groups"].items() if k.startswith("nounpp/")])}
    if "attractors" in r:  # natural-text dev items with >= 1 attractor
        out["natural_attr"] = _pooled(list(r["attractors"].values()))
    return out


CURVE_COLUMNS = ["step", "epoch", "tokens", "train_ppl", "valid_ppl", "lr", "seconds", "na_accuracy", "na_nounpp",
                 "natural_attr"]


def write_curve(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [c for c in CURVE_COLUMNS if any(c in h for h in history)] or CURVE_COLUMNS[:7]
    lines = [",".join(cols)] + [",".join(str(h.get(c, "")) for c in cols) for h in history]
    path.write_text("\n".join(lines) + "\n")
