"""Unit ablation on the NA task (Lakretz et al. 2019): agreement accuracy when units are silenced.

- :func:`verb_margins`: log P(good verb) - log P(bad verb) of one-prefix pairs under K unit masks in
  one pass. The prefixes form a trie (every NA prefix starts "<eos> the"), run depth by depth with
  no padding; a trie node is K batch columns, one per mask. Layers below the lowest ablated one are
  run once, unablated, and shared by all K columns.
- :func:`ablate`: Table 7, accuracy per construction x condition, full model vs ablated units.
- :func:`sweep`: every unit of every layer ablated on its own; a unit whose ablation costs at least
  ``THRESHOLD`` accuracy points in some condition is a number unit.

An ablated unit's h reads as 0 everywhere (see :mod:`agreelens.trace`): the same as zeroing its
outgoing weights. Only the two verbs' scores are computed: the verbs' logits plus those softmax
normalizers that do not cancel in the difference (an adaptive softmax's head never needs its
normalizer, a tail cluster only when just one of the two verbs is in it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from agreelens.files import write_text
from agreelens.model import device_of, evaluating
from agreelens.scoring import group_key, has_prefix_fields, prefix_trie, read_pairs
from agreelens.text import tokenize
from agreelens.trace import cell, layer_weights, lstm_of, lstm_step, split_mask, unit_mask
from agreelens.vocab import Vocab

THRESHOLD = 10.0  # accuracy points: a smaller drop is "-" in Table 7 and no number unit
PAPER_NAMES = {"simple": "Simple", "adv": "Adv", "adv_adv": "2Adv", "adv_conjunction": "CoAdv",
               "namepp": "namePP", "nounpp": "nounPP", "nounpp_adv": "nounPPAdv"}
ROWS = 512  # CPU: batch rows (nodes x masks) per LSTM step and per softmax block, to stay in cache


# ---------------------------------------------------------------------------------------- plan


@dataclass
class End:
    """The pairs whose prefixes end at one depth of the trie."""

    depth: int
    nodes: torch.Tensor  # (U,) distinct end nodes at this depth
    inv: torch.Tensor  # (E,) each pair's index into ``nodes``
    pairs: torch.Tensor  # (E,) index of each pair in the pair list
    good: torch.Tensor  # (E,) verb ids
    bad: torch.Tensor


@dataclass
class Plan:
    """One-prefix pairs as a prefix trie, depth by depth: each node's token and parent index."""

    tokens: list[torch.Tensor]
    parents: list[torch.Tensor]  # index into the previous depth (empty at depth 0)
    ends: list[End]
    scored: torch.Tensor  # (n,) False where a verb is out of the vocabulary


def plan_pairs(vocab: Vocab, pairs: list[dict], device=None) -> Plan:
    """Trie of ``<eos> + prefix`` for every pair whose two verbs are single in-vocabulary tokens."""
    seqs: list[list[int]] = []
    verbs: list[tuple[int, int, int]] = []  # (pair, good, bad) of each sequence
    scored = torch.zeros(len(pairs), dtype=torch.bool)
    for p, pair in enumerate(pairs):
        if not has_prefix_fields(pair):
            raise ValueError(f"pair {pair.get('UID')}/{pair.get('pairID')} lacks the one-prefix fields")
        good, bad = tokenize(pair["one_prefix_word_good"]), tokenize(pair["one_prefix_word_bad"])
        if len(good) != 1 or len(bad) != 1:
            raise ValueError(f"pair {pair.get('UID')}/{pair.get('pairID')}: ablation scoring needs one-token verbs")
        if good[0] not in vocab.stoi or bad[0] not in vocab.stoi:
            continue
        scored[p] = True
        seqs.append([vocab.eos, *vocab.encode(tokenize(pair["one_prefix_prefix"]))])
        verbs.append((p, vocab.stoi[good[0]], vocab.stoi[bad[0]]))
    tokens, parents, leaves = prefix_trie(seqs)
    ends: dict[int, list[tuple[int, int, int, int]]] = {}  # depth -> (pair, node, good, bad)
    for seq, node, (p, g, b) in zip(seqs, leaves, verbs):
        ends.setdefault(len(seq) - 1, []).append((p, node, g, b))

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    end_list = []
    for d in sorted(ends):
        p, node, g, b = zip(*ends[d])
        nodes, inv = torch.unique(t(node), return_inverse=True)
        end_list.append(End(d, nodes, inv, t(p), t(g), t(b)))
    return Plan([t(x) for x in tokens], [t(x if d else []) for d, x in enumerate(parents)], end_list, scored)


# ---------------------------------------------------------------------------------------- decoder


def _logsumexp_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``logsumexp(x @ w.T, -1)`` in blocks of rows through one reused buffer (no large temporaries)."""
    block = ROWS if x.device.type == "cpu" else max(1, x.size(0))
    out = x.new_empty(x.size(0))
    buf = x.new_empty(min(block, x.size(0)), w.size(0))
    for lo in range(0, x.size(0), block):
        z = torch.mm(x[lo : lo + block], w.T, out=buf[: min(block, x.size(0) - lo)])
        top = z.amax(-1, keepdim=True)
        out[lo : lo + z.size(0)] = z.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)
    return out


def _adaptive_scores(dec: nn.AdaptiveLogSoftmaxWithLoss, feats, words, inv, jg, jb) -> torch.Tensor:
    """(U, K, W) scores of ``words``: log P(w) + the head's log-normalizer (which cancels in a
    margin); a tail cluster's normalizer is subtracted at the nodes where a pair has one verb in it."""
    cut = dec.cutoffs  # [shortlist, ..., n_classes]
    cluster = torch.bucketize(words, torch.tensor(cut, device=words.device), right=True) - 1  # -1 head
    head_idx = torch.where(cluster < 0, words, dec.shortlist_size + cluster)
    s = feats @ dec.head.weight[head_idx].T
    if dec.head.bias is not None:
        s = s + dec.head.bias[head_idx]
    for i, tail in enumerate(dec.tail):
        in_i = cluster == i
        if not bool(in_i.any()):
            continue
        proj = feats @ tail[0].weight.T  # (U, K, hsz)
        out_w = tail[1].weight
        s[..., in_i] += proj @ out_w[words[in_i] - cut[i]].T
        need = torch.unique(inv[in_i[jg] ^ in_i[jb]])  # nodes where the normalizer does not cancel
        if need.numel():
            corr = torch.zeros(s.shape[:2], dtype=s.dtype, device=s.device)
            corr[need] = _logsumexp_mm(proj[need].reshape(-1, proj.size(-1)), out_w).view(need.numel(), -1)
            s[..., in_i] -= corr.unsqueeze(-1)
    return s


def end_margins(model: nn.Module, feats: torch.Tensor, end: End) -> torch.Tensor:
    """(E, K) margins of the pairs of ``end`` from the features (U, K, H) of its end nodes."""
    dec = getattr(model, "decoder", None)
    e = end.pairs.numel()
    words, wi = torch.unique(torch.cat([end.good, end.bad]), return_inverse=True)
    jg, jb = wi[:e], wi[e:]
    if isinstance(dec, nn.Linear):
        s = feats @ dec.weight[words].T + dec.bias[words]
    elif isinstance(dec, nn.AdaptiveLogSoftmaxWithLoss):
        s = _adaptive_scores(dec, feats.float(), words, end.inv, jg, jb)
    else:  # any other decoder: its own target_log_probs
        f = feats[end.inv]
        e, k, h = f.shape
        tgt = torch.stack([end.good, end.bad], -1).unsqueeze(1).expand(e, k, 2)
        lp = model.target_log_probs(f.unsqueeze(2).expand(e, k, 2, h), tgt)
        return (lp[..., 0] - lp[..., 1]).double()
    return (s[end.inv, :, jg] - s[end.inv, :, jb]).double()


# ---------------------------------------------------------------------------------------- running


class Runner:
    """Runs a plan's trie under unit masks; unablated lower layers are computed once and cached."""

    def __init__(self, model: nn.Module, plan: Plan):
        rnn = lstm_of(model)
        self.model, self.plan = model, plan
        self.layers, self.hidden_size = rnn.num_layers, rnn.hidden_size
        self.w = [layer_weights(rnn, k + 1) for k in range(self.layers)]
        self._gx: dict[int, list[torch.Tensor]] = {}

    def input_gates(self, layer: int) -> list[torch.Tensor]:
        """Per depth, (N_d, 1, 4H): the input part of ``layer``'s gates (0-based) with every layer
        below it unablated."""
        if layer not in self._gx:
            xs = [self.model.encoder(tok) for tok in self.plan.tokens]
            for k in range(layer):
                w_ih, w_hh, b = self.w[k]
                h = c = None
                hs = []
                for d, x in enumerate(xs):
                    par = self.plan.parents[d]
                    hp, cp = (None, None) if d == 0 else (h[par], c[par])
                    *_, c, h = cell(torch.addmm(b, x, w_ih.T), hp, cp, w_hh)
                    hs.append(h)
                xs = hs
            w_ih, _, b = self.w[layer]
            self._gx[layer] = [torch.addmm(b, x, w_ih.T).unsqueeze(1) for x in xs]
        return self._gx[layer]

    def margins(self, masks: torch.Tensor) -> torch.Tensor:
        """(K, n) float64 margins under the (K, layers*H) unit masks (NaN for unscored pairs)."""
        plan, top, hsz, k_masks = self.plan, self.layers - 1, self.hidden_size, masks.size(0)
        m = [x.unsqueeze(0) for x in split_mask(masks, hsz, self.layers)]  # (1, K, H)
        ablated = [k for k in range(self.layers) if bool((m[k] == 0).any())]
        start = min(ablated) if ablated else top
        gx0 = self.input_gates(start)
        out = torch.full((k_masks, plan.scored.numel()), float("nan"), dtype=torch.float64)
        ends = {e.depth: e for e in plan.ends}
        block = max(1, ROWS // k_masks) if masks.device.type == "cpu" else 1 << 30  # nodes per step
        h: list = [None] * self.layers  # per layer, (N_d, K, H) at the last depth, h as read (masked)
        c: list = [None] * self.layers
        for d, par in enumerate(plan.parents):
            n = plan.tokens[d].numel()
            h_new = [masks.new_empty(n, k_masks, hsz) if k >= start else None for k in range(self.layers)]
            c_new = [masks.new_empty(n, k_masks, hsz) if k >= start else None for k in range(self.layers)]
            for lo in range(0, n, block):
                sl = slice(lo, lo + block)
                x = None
                for k in range(start, self.layers):
                    hp, cp = (None, None) if d == 0 else (h[k][par[sl]], c[k][par[sl]])
                    self._step(k, gx0[d][sl] if k == start else None, x, hp, cp, m[k], h_new[k][sl], c_new[k][sl])
                    x = h_new[k][sl]
            h, c = h_new, c_new
            end = ends.get(d)
            if end is not None:
                out[:, end.pairs.cpu()] = end_margins(self.model, h[top][end.nodes], end).T.cpu()
        return out

    def _step(self, k, gx, x, hp, cp, m, h_out, c_out) -> None:
        """Layer ``k`` (0-based) for a block of n nodes x K masks: from the shared input gates ``gx``
        (n, 1, 4H) or the layer below's output ``x`` (n, K, H), and the parents' ``hp`` (as read) and
        ``cp`` (None at depth 0). Writes h (masked: as it is read) and c into ``h_out``, ``c_out``."""
        w_ih, w_hh, b = self.w[k]
        n, k_masks, hsz = h_out.shape
        if gx is None:
            gates = torch.addmm(b, x.reshape(n * k_masks, -1), w_ih.T)
            if hp is not None:
                gates.addmm_(hp.reshape(n * k_masks, hsz), w_hh.T)
        elif hp is None:
            gates = gx.expand(n, k_masks, -1).clone(memory_format=torch.contiguous_format).view(n * k_masks, -1)
        else:
            gates = hp.reshape(n * k_masks, hsz) @ w_hh.T
            gates.view(n, k_masks, -1).add_(gx)
        lstm_step(gates.view(n, k_masks, -1), cp, out=(c_out, h_out))
        h_out.mul_(m)


def verb_margins(model: nn.Module, vocab: Vocab, pairs: list[dict], masks: torch.Tensor,
                 chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(good) - log P(bad) of each one-prefix pair under each unit mask: ``(margins (K, n) float64
    on the CPU, NaN where unscored; scored (n,) bool)``. ``masks`` (K, layers*H), 0 = ablated; ``chunk``
    masks run per pass."""
    device = device_of(model)
    plan = plan_pairs(vocab, pairs, device)
    masks = masks.to(device=device, dtype=torch.float32).reshape(-1, masks.size(-1))
    with evaluating(model):
        runner = Runner(model, plan)
        margins = torch.cat([runner.margins(mk) for mk in masks.split(chunk)])
    return margins, plan.scored


def _group_order(key: str) -> tuple:
    """Constructions in the paper's order, then conditions S, P, SS, SP, PS, PP."""
    cons, _, cond = key.partition("/")
    c = list(PAPER_NAMES).index(cons) if cons in PAPER_NAMES else len(PAPER_NAMES)
    return c, ("S", "P", "SS", "SP", "PS", "PP", cond).index(cond), key


def group_accuracy(pairs: list[dict], margins: torch.Tensor, scored: torch.Tensor) -> tuple[list[str], torch.Tensor,
                                                                                          torch.Tensor]:
    """``(keys, accuracy (K, G), n (G,))`` per ``construction/condition`` group (as ``summarize``:
    accuracy over scored pairs, correct when the margin > 0, 0.0 for a group with none scored)."""
    keys = sorted({group_key(p) for p in pairs}, key=_group_order)
    col = torch.tensor([keys.index(group_key(p)) for p in pairs])
    onehot = torch.zeros(len(pairs), len(keys), dtype=torch.float64)
    onehot[torch.arange(len(pairs)), col] = scored.double()
    correct = ((margins > 0) & scored).double()  # NaN > 0 is False
    n = onehot.sum(0)
    return keys, (correct @ onehot) / n.clamp(min=1), n.long()


# ---------------------------------------------------------------------------------------- Table 7


def _label(units: list[int]) -> str:
    return "+".join(str(u) for u in units)


def ablate(model: nn.Module, vocab: Vocab, pairs: list[dict], units: list[int], group: bool = True,
           threshold: float = THRESHOLD) -> dict:
    """Accuracy per group, full model vs each unit ablated alone and (``group``, several units) all
    together: ``{"units", "ablations", "threshold", "accuracy": {"full", label...}, "groups": {key:
    {"n", "full", label...}}}``, accuracies as fractions."""
    rnn = lstm_of(model)
    hsz, layers = rnn.hidden_size, rnn.num_layers
    ablations = [[u] for u in units] + ([list(units)] if group and len(units) > 1 else [])
    masks = torch.stack([torch.ones(layers * hsz)] + [unit_mask(a, hsz, layers) for a in ablations])
    margins, scored = verb_margins(model, vocab, pairs, masks)
    keys, acc, n = group_accuracy(pairs, margins, scored)
    labels = ["full"] + [_label(a) for a in ablations]
    total = int(scored.sum())
    overall = ((margins > 0) & scored).sum(1).double() / max(1, total)
    return {
        "units": list(units),
        "ablations": labels[1:],
        "threshold": threshold,
        "n": total,
        "oov": len(pairs) - total,
        "accuracy": {lab: round(float(a), 4) for lab, a in zip(labels, overall)},
        "groups": {key: {"n": int(n[g]), **{lab: round(float(acc[r, g]), 4) for r, lab in enumerate(labels)}}
                   for g, key in enumerate(keys)},
    }


def _row_order(key: str) -> tuple:
    """Table 7's order: singular subjects first, then plural; constructions as in the paper."""
    return (0 if key.partition("/")[2].startswith("S") else 1, *_group_order(key))


def table7_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Table 7: NA task, condition, accuracy (%) under each ablation ("-" where it
    drops less than ``threshold`` points below the full model), full model."""
    header = ["NA task", "C", *[f"Ablated {a}" for a in result["ablations"]], "Full"]
    rows = []
    for key in sorted(result["groups"], key=_row_order):
        g = result["groups"][key]
        cons, _, cond = key.partition("/")
        cells = [f"{100 * g[a]:.1f}" if 100 * (g["full"] - g[a]) >= result["threshold"] else "-"
                 for a in result["ablations"]]
        rows.append([PAPER_NAMES.get(cons, cons), cond, *cells, f"{100 * g['full']:.1f}"])
    return header, rows


# ---------------------------------------------------------------------------------------- sweep


CPU_CHUNK = 32  # ablations per pass on a CPU (rows stay in cache)
CUDA_CHUNK = 256  # on CUDA: wide passes keep the GPU busy; at most 256 bounds the memory of one pass


def resolve_chunk(chunk: int, hidden_size: int, device: torch.device | str) -> int:
    """``chunk`` units per sweep pass, or for 0 the device's default: 32 on a CPU; on CUDA a whole layer,
    up to 256 units (H200, 256x2 model: 1,887 units/s at 256 per pass vs 1,263 at 64; a 650-unit layer
    at 256 per pass holds about 5 GB of gates for the 4,570 NA prefixes)."""
    if chunk:
        return chunk
    return min(hidden_size, CUDA_CHUNK) if torch.device(device).type == "cuda" else CPU_CHUNK


def sweep_chunks(hidden_size: int, layers: int, chunk: int = CPU_CHUNK) -> list[list[int]]:
    """The passes of a full sweep: every unit (1..layers*H) in chunks of at most ``chunk`` units, a chunk
    never spanning two layers (the lower layers stay shared). Any subset of them is a part of the sweep
    (:func:`sweep_part`, e.g. one task per part on a cluster); :func:`merge_sweep` of parts covering them
    all equals :func:`sweep` with the same ``chunk`` exactly (each unit's pass has the same masks)."""
    out = []
    for layer in range(layers):
        units = list(range(layer * hidden_size + 1, (layer + 1) * hidden_size + 1))
        out += [units[lo:lo + chunk] for lo in range(0, hidden_size, chunk)]
    return out


def _sweep_pairs(pairs: list[dict], constructions: list[str] | None) -> list[dict]:
    if constructions:
        known = sorted({p.get("construction") for p in pairs if p.get("construction")})
        unknown = [c for c in constructions if c not in known]
        if unknown:
            raise ValueError(f"unknown construction(s) {', '.join(unknown)}; known: {', '.join(known)}")
        pairs = [p for p in pairs if p.get("construction") in constructions]
    return pairs


def sweep_part(model: nn.Module, vocab: Vocab, pairs: list[dict], chunks: list[list[int]],
               constructions: list[str] | None = None, full: bool = True, progress: bool = False) -> dict:
    """Accuracy per ``construction/condition`` group with each unit of ``chunks`` ablated alone (one pass
    per chunk, see :func:`sweep_chunks`) and, with ``full``, of the unablated model. JSON-able: ``{"hidden_size",
    "layers", "conditions", "n", "pairs", "oov", "full": [accuracy per group] or None, "units": {"<unit>":
    [accuracy per group]}}``; :func:`merge_sweep` turns parts into the sweep's result."""
    pairs = _sweep_pairs(pairs, constructions)
    rnn = lstm_of(model)
    hsz, layers = rnn.hidden_size, rnn.num_layers
    device = device_of(model)
    plan = plan_pairs(vocab, pairs, device)
    rows, done = [], []
    with evaluating(model):
        runner = Runner(model, plan)
        base = runner.margins(torch.ones(1, layers * hsz, device=device)) if full else None
        bar = tqdm(total=sum(len(c) for c in chunks), desc="sweep", unit="unit", disable=not progress,
                   dynamic_ncols=True, mininterval=1.0)
        for batch in chunks:
            if len({(u - 1) // hsz for u in batch}) != 1 or not 1 <= min(batch) <= max(batch) <= layers * hsz:
                raise ValueError(f"a sweep chunk must hold units of one layer (1..{layers * hsz}): {batch}")
            masks = torch.ones(len(batch), layers * hsz, device=device)
            masks[torch.arange(len(batch)), torch.tensor(batch) - 1] = 0.0
            rows.append(runner.margins(masks))
            done += batch
            bar.update(len(batch))
        bar.close()
    keys, acc, n = group_accuracy(pairs, torch.cat(rows), plan.scored) if rows else (None, None, None)
    if full:
        keys, base_acc, n = group_accuracy(pairs, base, plan.scored)
    elif keys is None:
        keys, _, n = group_accuracy(pairs, torch.empty(0, len(pairs), dtype=torch.float64), plan.scored)
    return {
        "hidden_size": hsz,
        "layers": layers,
        "conditions": keys,
        "n": [int(x) for x in n],
        "pairs": int(plan.scored.sum()),
        "oov": len(pairs) - int(plan.scored.sum()),
        "full": base_acc[0].tolist() if full else None,
        "units": {str(u): acc[i].tolist() for i, u in enumerate(done)},
    }


def merge_sweep(parts: list[dict], threshold: float = THRESHOLD, seconds: float = 0.0) -> dict:
    """The sweep's result (as :func:`sweep`) from parts (:func:`sweep_part`) that cover every unit once
    and of which one has the full model's accuracy."""
    if not parts:
        raise ValueError("no sweep parts to merge")
    first = parts[0]
    hsz, layers, keys = first["hidden_size"], first["layers"], first["conditions"]
    for p in parts:
        if (p["hidden_size"], p["layers"], p["conditions"], p["n"]) != (hsz, layers, keys, first["n"]):
            raise ValueError("sweep parts of different models or stimuli cannot be merged")
    full = next((p["full"] for p in parts if p["full"] is not None), None)
    if full is None:
        raise ValueError("no sweep part has the full model's accuracy (sweep_part(..., full=True))")
    found = {u: acc for p in parts for u, acc in p["units"].items()}
    all_units = list(range(1, layers * hsz + 1))
    missing = [u for u in all_units if str(u) not in found]
    if missing or sum(len(p["units"]) for p in parts) != len(all_units):
        raise ValueError(f"sweep parts must cover each unit once (missing: {missing[:10]}...)")
    base = torch.tensor([full], dtype=torch.float64)
    acc = torch.tensor([found[str(u)] for u in all_units], dtype=torch.float64).reshape(len(all_units), len(keys))
    drops = 100 * (base - acc)  # (units, G)
    max_drop, worst = drops.max(1)
    number = [u for u in all_units if float(max_drop[u - 1]) >= threshold]
    number.sort(key=lambda u: -float(max_drop[u - 1]))
    return {
        "hidden_size": hsz,
        "layers": layers,
        "threshold": threshold,
        "pairs": first["pairs"],
        "oov": first["oov"],
        "seconds": round(seconds, 2),
        "conditions": keys,
        "n": {k: int(x) for k, x in zip(keys, first["n"])},
        "base_accuracy": {k: round(float(a), 4) for k, a in zip(keys, base[0])},
        "number_units": [{"unit": u, "layer": (u - 1) // hsz + 1, "index": (u - 1) % hsz,
                          "max_drop": round(float(max_drop[u - 1]), 2), "condition": keys[int(worst[u - 1])]}
                         for u in number],
        "drops": {str(u): [round(float(x), 2) for x in drops[u - 1]] for u in all_units},
    }


def sweep(model: nn.Module, vocab: Vocab, pairs: list[dict], constructions: list[str] | None = None,
          chunk: int = 0, progress: bool = True, threshold: float = THRESHOLD) -> dict:
    """Ablate every unit alone; per unit and ``construction/condition`` group, the accuracy drop in
    points (full minus ablated). Units that cost >= ``threshold`` points in some group are the number
    units. For units above layer 1 the lower layers run once, not once per unit. ``chunk`` units per
    pass (0: :func:`resolve_chunk`'s default for the model's device)."""
    t0 = time.perf_counter()
    rnn = lstm_of(model)
    chunk = resolve_chunk(chunk, rnn.hidden_size, device_of(model))
    part = sweep_part(model, vocab, pairs, sweep_chunks(rnn.hidden_size, rnn.num_layers, chunk), constructions,
                      full=True, progress=progress)
    return merge_sweep([part], threshold, seconds=time.perf_counter() - t0)


def plot_sweep(result: dict, path: str | Path, top: int = 40, title: str = "") -> Path:
    """Heat map of accuracy drops (points), the ``top`` units by largest drop x the groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hsz = result["hidden_size"]
    ranked = sorted(result["drops"], key=lambda u: -max(result["drops"][u]))[:top]
    data = torch.tensor([result["drops"][u] for u in ranked], dtype=torch.float64).numpy()
    number = {x["unit"] for x in result["number_units"]}
    labels = [f"{'* ' if int(u) in number else ''}{u} (L{(int(u) - 1) // hsz + 1}.{(int(u) - 1) % hsz})"
              for u in ranked]
    vmax = max(result["threshold"], float(abs(data).max()) if data.size else 1.0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(result["conditions"]), 1.5 + 0.25 * len(ranked)))
    im = ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(result["conditions"])), result["conditions"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(ranked)), labels, fontsize=7)
    ax.set_title(title or f"accuracy drop when one unit is ablated (top {len(ranked)}; "
                          f"* >= {result['threshold']:g} points)", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy drop (points)")
    from agreelens.plots import save_figure

    return save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------- stages


def load_stimuli(stimuli_dir: str | Path = "stimuli") -> list[dict]:
    files = sorted(Path(stimuli_dir).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{stimuli_dir}: no stimuli; run `agreelens stimuli` (or `dvc repro`)")
    return read_pairs(files)


def _analysis(params):
    """``(threshold, sweep constructions)`` from params.yaml's ``analysis`` section ([] = all)."""
    return params.analysis.threshold, list(params.analysis.sweep_constructions) or None


def _load(params, name: str):
    from agreelens.model import default_device, load_model
    from agreelens.na import resolve_model

    torch.set_num_threads(params.train.threads or os.cpu_count() or 1)
    return load_model(resolve_model(name), default_device())


def run_ablate(params, name: str, units: str | list[int], stimuli_dir: str | Path = "stimuli") -> dict:
    """Table 7 of model ``name`` for the units (``"776,988"`` or a list)."""
    from agreelens.trace import parse_units

    pairs = load_stimuli(stimuli_dir)
    model, vocab = _load(params, name)
    rnn = lstm_of(model)
    units = parse_units(units, rnn.hidden_size, rnn.num_layers)
    return {"model": name, **ablate(model, vocab, pairs, units, threshold=_analysis(params)[0])}


def run_sweep(params, name: str, constructions: list[str] | None = None, stimuli_dir: str | Path = "stimuli",
              metrics: str | Path = "metrics", figures: str | Path = "reports/figures", chunk: int | None = None,
              progress: bool = True) -> tuple[dict, Path, Path]:
    """Sweep model ``name``; writes ``metrics/units_<name>.json`` and ``reports/figures/sweep_<name>.png``.
    Constructions default to ``analysis.sweep_constructions`` (else all), the threshold to
    ``analysis.threshold``, ``chunk`` to ``scale.sweep_chunk`` (0: by device, :func:`resolve_chunk`)."""
    threshold, default_constructions = _analysis(params)
    pairs = load_stimuli(stimuli_dir)
    model, vocab = _load(params, name)
    chunk = params.scale.sweep_chunk if chunk is None else chunk
    result = sweep(model, vocab, pairs, constructions or default_constructions, chunk=chunk, progress=progress,
                   threshold=threshold)
    return save_sweep(result, name, metrics, figures)


def run_sweep_part(params, name: str, chunks: list[list[int]], full: bool = True,
                   constructions: list[str] | None = None, stimuli_dir: str | Path = "stimuli") -> dict:
    """One part of model ``name``'s sweep (:func:`sweep_part`): the units of ``chunks``, e.g. one task of a
    distributed sweep; :func:`finish_sweep` merges the parts and writes what :func:`run_sweep` writes."""
    pairs = load_stimuli(stimuli_dir)
    model, vocab = _load(params, name)
    return sweep_part(model, vocab, pairs, chunks, constructions or _analysis(params)[1], full=full)


def sweep_model_shape(name: str) -> tuple[int, int]:
    """``(hidden_size, layers)`` of model ``name`` (from its config, without loading the weights)."""
    from agreelens.na import resolve_model

    cfg = json.loads((resolve_model(name) / "config.json").read_text())
    model = cfg.get("model", cfg)
    return int(model["hidden_size"]), int(model["layers"])


def finish_sweep(params, name: str, parts: list[dict], seconds: float = 0.0, metrics: str | Path = "metrics",
                 figures: str | Path = "reports/figures") -> tuple[dict, Path, Path]:
    """Merge the parts of model ``name``'s sweep; writes the same files as :func:`run_sweep`."""
    return save_sweep(merge_sweep(parts, _analysis(params)[0], seconds), name, metrics, figures)


def save_sweep(result: dict, name: str, metrics: str | Path = "metrics",
               figures: str | Path = "reports/figures") -> tuple[dict, Path, Path]:
    result = {"model": name, **result}
    tag = Path(name).name
    out = Path(metrics) / f"units_{tag}.json"
    write_text(out, json.dumps(result, indent=1) + "\n")
    fig = plot_sweep(result, Path(figures) / f"sweep_{tag}.png",
                     title=f"{tag}: accuracy drop per ablated unit (top 40; * number unit)")
    return result, out, fig

