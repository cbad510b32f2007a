"""Batched minimal-pair scoring of a language model (NA-task stimuli, BLiMP).

A pair is a good and a bad sentence (BLiMP-style JSON fields). The model gets it right when it gives
the good one the higher log-probability; ties count as wrong. Two ways to compare:

``prefix`` (BLiMP's one-prefix method)
    log P(word_good | <eos> prefix) vs log P(word_bad | <eos> prefix). The prefix runs once and both
    words' log-probabilities are read at its last position with ``model.target_log_probs`` (for an
    adaptive softmax only the head and the words' own clusters are computed). A word of several
    tokens is scored as the sum of its tokens' log-probabilities after the prefix.
``sentence``
    log P(<eos> sentence <eos>) summed over every predicted token, the final <eos> included.
``auto``
    ``prefix`` where a pair has the one-prefix fields, else ``sentence``.

Text goes through :func:`agreelens.text.tokenize`, as the training corpus did, and the LM is primed
with ``<eos>``, the token that precedes every sentence in training. A pair whose differing words (the
two target words; for ``sentence`` the tokens where the two sentences differ) are not all in the
vocabulary cannot be compared fairly: it is counted in ``oov`` and not scored. Unknown words in the
shared context become ``<unk>``, as in training.

One-prefix pairs run through a trie of their prefixes: the LSTM steps once per distinct prefix, depth
by depth, each batch of nodes continuing from its parents' states (NA prefixes share "<eos> the boy
..."). Whole sentences are sorted by length, padded to the batch's longest (time-major) and run in one
forward pass per batch. All under ``torch.inference_mode()`` with the model in eval mode.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, model_validator
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from agreelens.model import device_of, evaluating
from agreelens.text import tokenize
from agreelens.vocab import Vocab

REQUIRED_FIELDS = ("sentence_good", "sentence_bad", "UID", "pairID")
PREFIX_FIELDS = ("one_prefix_prefix", "one_prefix_word_good", "one_prefix_word_bad")
METHODS = ("auto", "prefix", "sentence")


class Pair(BaseModel):
    """One minimal pair, as BLiMP writes it: the pair files, ``agreelens score`` and the service's ``/score``
    all read this model. The one-prefix fields come together or not at all; other fields are kept."""

    model_config = ConfigDict(extra="allow")
    sentence_good: StrictStr
    sentence_bad: StrictStr
    UID: StrictStr | StrictInt
    pairID: StrictStr | StrictInt
    one_prefix_prefix: StrictStr | None = None
    one_prefix_word_good: StrictStr | None = None
    one_prefix_word_bad: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _required_fields_present(cls, data):
        if isinstance(data, dict):
            missing = [f for f in REQUIRED_FIELDS if data.get(f) is None]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
        return data

    @model_validator(mode="after")
    def _prefix_fields_together(self) -> "Pair":
        present = [f for f in PREFIX_FIELDS if getattr(self, f) is not None]
        if present and len(present) != len(PREFIX_FIELDS):
            absent = [f for f in PREFIX_FIELDS if f not in present]
            raise ValueError(f"has {', '.join(present)} but not {', '.join(absent)}")
        return self


def pair_problem(rec) -> str | None:
    """Why ``rec`` is not a :class:`Pair` (one short sentence naming the field), or None."""
    if not isinstance(rec, dict):
        return f"expected an object, got {type(rec).__name__}"
    try:
        Pair.model_validate(rec)
    except ValidationError as err:
        e = err.errors()[0]
        if e["loc"]:
            field = e["loc"][0]
            kind = "string or an integer" if field in ("UID", "pairID") else "string"
            return f"{field} must be a {kind}, got {rec.get(field)!r}"
        return str(e["msg"]).removeprefix("Value error, ")
    return None


def read_pairs(paths: str | Path | Iterable[str | Path]) -> list[dict]:
    """Minimal pairs (:class:`Pair` objects as dicts) from BLiMP-style ``.jsonl`` files (one JSON object a
    line; blank lines skipped); a bad line raises ``ValueError`` naming the file, the line and the field."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    pairs: list[dict] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such pairs file")
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
                problem = pair_problem(rec)
                if problem:
                    raise ValueError(f"{path}:{lineno}: {problem}")
                pairs.append(rec)
    return pairs


def has_prefix_fields(pair: dict) -> bool:
    return all(isinstance(pair.get(f), str) for f in PREFIX_FIELDS)


def _differing(a: list[str], b: list[str]) -> list[str]:
    """Tokens of ``a`` and ``b`` left once their common beginning and end are stripped."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    return a[i : len(a) - j] + b[i : len(b) - j]


def _chunks(order: list[int], size: int):
    for i in range(0, len(order), size):
        yield order[i : i + size]


def _pad(seqs: list[list[int]], pad: int, device) -> torch.Tensor:
    """Time-major (T, B) padded id tensor."""
    return pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], padding_value=pad).to(device)


def pair_margins(
    model: nn.Module,
    vocab: Vocab,
    pairs: list[dict],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair margins ``log P(good) - log P(bad)`` (float64, on the CPU) and a bool mask of the pairs
    that were scored (False: out-of-vocabulary target words; their margin is NaN).

    ``batch_size`` is the number of sequences per forward pass. ``device``: where to run (the model is
    moved there); default the model's own device.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        model.to(device)
    device = device_of(model)

    n = len(pairs)
    margins = torch.full((n,), float("nan"), dtype=torch.float64)
    scored = torch.zeros(n, dtype=torch.bool)
    eos, stoi = vocab.eos, vocab.stoi

    # plan: single-token prefix pairs (one prefix run, two targets) and sequence jobs
    fast_idx: list[int] = []
    fast_seq: list[list[int]] = []
    fast_tgt: list[tuple[int, int]] = []
    job_idx: list[int] = []  # pair index
    job_sign: list[float] = []  # +1 good, -1 bad
    job_seq: list[list[int]] = []  # <eos> + tokens; inputs seq[:-1], targets seq[1:]
    job_from: list[int] = []  # first target position that is scored
    for i, pair in enumerate(pairs):
        use_prefix = method == "prefix" or (method == "auto" and has_prefix_fields(pair))
        if use_prefix:
            if not has_prefix_fields(pair):
                raise ValueError(
                    f"pair {pair.get('UID')}/{pair.get('pairID')} lacks the one-prefix fields "
                    f"{', '.join(PREFIX_FIELDS)} needed by method 'prefix'"
                )
            prefix = vocab.encode(tokenize(pair["one_prefix_prefix"]))
            good = tokenize(pair["one_prefix_word_good"])
            bad = tokenize(pair["one_prefix_word_bad"])
            if any(t not in stoi for t in _differing(good, bad)):
                continue
            scored[i] = True
            if len(good) == 1 and len(bad) == 1:
                fast_idx.append(i)
                fast_seq.append([eos, *prefix])
                fast_tgt.append((stoi[good[0]], stoi[bad[0]]))
                continue
            for sign, word in ((1.0, good), (-1.0, bad)):
                job_idx.append(i)
                job_sign.append(sign)
                job_seq.append([eos, *prefix, *vocab.encode(word)])
                job_from.append(len(prefix))
        else:
            good = tokenize(pair["sentence_good"])
            bad = tokenize(pair["sentence_bad"])
            if any(t not in stoi for t in _differing(good, bad)):
                continue
            scored[i] = True
            for sign, sent in ((1.0, good), (-1.0, bad)):
                job_idx.append(i)
                job_sign.append(sign)
                job_seq.append([eos, *vocab.encode(sent), eos])
                job_from.append(0)

    with evaluating(model):
        if fast_idx:
            out = _score_fast(model, fast_seq, fast_tgt, batch_size, eos, device)
            margins[torch.tensor(fast_idx)] = out
        if job_idx:
            sums = _score_jobs(model, job_seq, job_from, batch_size, eos, device)
            sums *= torch.tensor(job_sign, dtype=torch.float64)
            idx = torch.tensor(job_idx)
            acc = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, sums)
            margins[idx] = acc[idx]
    return margins, scored


def _select(hidden, index: torch.Tensor):
    """The recurrent state of the chosen batch columns ((layers, B, H) tensors; None stays None)."""
    if hidden is None:
        return None
    return tuple(h.index_select(1, index) for h in hidden)


def _cat(parts: list):
    if parts[0] is None:
        return None
    return tuple(torch.cat(hs, dim=1) for hs in zip(*parts))


def prefix_trie(seqs: list[list[int]]) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """The prefix trie of token sequences, depth by depth: ``(tokens, parents, leaves)``. ``tokens[d]``
    holds the token of each node at depth d, ``parents[d]`` each node's parent index at depth d - 1 (-1
    at depth 0), ``leaves[k]`` the index of the node (at depth ``len(seqs[k]) - 1``) where sequence k
    ends. Sequences that begin alike share the nodes of their common beginning."""
    tokens: list[list[int]] = []
    parents: list[list[int]] = []
    index: dict[tuple[int, int, int], int] = {}  # (depth, parent, token) -> node
    leaves = [0] * len(seqs)
    for k, seq in enumerate(seqs):
        node = -1
        for d, tok in enumerate(seq):
            if d == len(tokens):
                tokens.append([])
                parents.append([])
            child = index.get((d, node, tok))
            if child is None:
                child = index[(d, node, tok)] = len(tokens[d])
                tokens[d].append(tok)
                parents[d].append(node)
            node = child
        leaves[k] = node
    return tokens, parents, leaves


def _score_fast(model, seqs, targets, batch_size, pad, device) -> torch.Tensor:
    """log P(good) - log P(bad) after each prefix, read at the prefix's last position.

    Prefixes share their beginnings (every NA prefix starts "<eos> the", 15 verbs follow one "the boy"),
    so the LSTM runs once per node of the prefix trie, depth by depth (``batch_size`` nodes per forward
    pass), each node starting from its parent's state. An LSTM state depends only on the tokens read,
    so this equals running every prefix on its own, with 4x fewer LSTM steps on the NA stimuli.
    """
    del pad  # no padding: a depth of the trie is a batch of equal-length prefixes
    out = torch.empty(len(seqs), dtype=torch.float64)
    tokens, parents, leaf = prefix_trie(seqs)
    ending: dict[int, list[int]] = {}  # depth -> the pairs whose prefix ends there
    for k, seq in enumerate(seqs):
        ending.setdefault(len(seq) - 1, []).append(k)
    tgt = torch.tensor(targets, dtype=torch.long)
    hidden = None
    for d, toks in enumerate(tokens):
        ids = torch.tensor(toks, dtype=torch.long, device=device)
        par = torch.tensor(parents[d], dtype=torch.long, device=device)
        feats, states = [], []
        for lo in range(0, len(toks), batch_size):
            h0 = _select(hidden, par[lo : lo + batch_size]) if d else None
            f, h = model(ids[lo : lo + batch_size].unsqueeze(0), h0)
            feats.append(f[0])
            states.append(h)
        features = torch.cat(feats)
        hidden = _cat(states) if d + 1 < len(tokens) else None
        ends = ending.get(d)
        if ends:
            ends_t = torch.tensor(ends)
            last = features[torch.tensor([leaf[k] for k in ends], device=device)]  # (E, H)
            pair = tgt[ends_t].to(device)
            if hasattr(model, "target_margin"):  # only the two words' logits: the normalisers cancel
                margin = model.target_margin(last, pair[:, 0], pair[:, 1])
            else:
                lp = model.target_log_probs(last.unsqueeze(1).expand(len(ends), 2, last.size(-1)), pair)
                margin = lp[:, 0] - lp[:, 1]
            out[ends_t] = margin.double().cpu()
    return out


def _score_jobs(model, seqs, starts, batch_size, pad, device) -> torch.Tensor:
    """Sum of log P(seq[t+1] | seq[:t+1]) over t >= start, for each sequence."""
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
    out = torch.zeros(len(seqs), dtype=torch.float64)
    lengths = torch.tensor([len(s) for s in seqs])
    start = torch.tensor(starts)
    for chunk in _chunks(order, batch_size):
        chunk_t = torch.tensor(chunk)
        n_pred = lengths[chunk_t] - 1  # predictions per sequence
        if int(n_pred.max()) < 1:
            continue
        ids = _pad([seqs[k] for k in chunk], pad, device)  # (T+1, B)
        inputs, targets = ids[:-1], ids[1:]
        t = torch.arange(inputs.size(0)).unsqueeze(1)
        mask = ((t >= start[chunk_t]) & (t < n_pred)).to(device)  # (T, B)
        features, _ = model(inputs)
        lp = model.target_log_probs(features[mask], targets[mask])  # only the scored positions
        cols = mask.nonzero()[:, 1]
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, cols, lp.double())
        out[chunk_t] = sums.cpu()
    return out


def group_key(pair: dict) -> str:
    """``<construction>/<condition>`` for NA-task stimuli, else the pair's UID."""
    if pair.get("construction") is not None and pair.get("condition") is not None:
        return f"{pair['construction']}/{pair['condition']}"
    return str(pair["UID"])


def summarize(pairs: list[dict], margins: torch.Tensor, scored: torch.Tensor) -> dict:
    """Accuracy overall and per group from per-pair margins; a pair is correct when its margin > 0."""
    correct = (scored & (margins > 0)).tolist()
    scored_l = scored.tolist()
    groups: dict[str, dict] = {}
    for pair, ok, s in zip(pairs, correct, scored_l):
        g = groups.setdefault(group_key(pair), {"accuracy": 0.0, "n": 0, "oov": 0, "_correct": 0})
        if s:
            g["n"] += 1
            g["_correct"] += int(ok)
        else:
            g["oov"] += 1
    for g in groups.values():
        g["accuracy"] = g.pop("_correct") / g["n"] if g["n"] else 0.0
    n = int(scored.sum())
    out = {
        "accuracy": sum(correct) / n if n else 0.0,
        "n": n,
        "oov": len(pairs) - n,
        "groups": dict(sorted(groups.items())),
    }
    if any("n_attractors" in p for p in pairs):  # natural-text pairs: accuracy per attractor count (0 .. 4+)
        buckets: dict[str, list[int]] = {}
        for pair, ok, s in zip(pairs, correct, scored_l):
            if s and "n_attractors" in pair:
                n_att = int(pair["n_attractors"])
                buckets.setdefault(str(n_att) if n_att < 4 else "4+", []).append(int(ok))
        out["attractors"] = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(buckets.items())}
    return out


def score_pairs(
    model: nn.Module,
    vocab: Vocab,
    pairs: list[dict],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    method: str = "auto",
) -> dict:
    """``{"accuracy", "n", "oov", "groups": {key: {"accuracy", "n", "oov"}}, "method"}``.

    ``n`` counts scored pairs, ``oov`` the pairs left unscored for out-of-vocabulary target words;
    accuracies are over scored pairs (0.0 where none was scored).
    """
    margins, scored = pair_margins(model, vocab, pairs, batch_size=batch_size, device=device, method=method)
    return {**summarize(pairs, margins, scored), "method": method}
