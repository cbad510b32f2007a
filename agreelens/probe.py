"""Probing classifiers on frozen LSTM states.

- (a) Grammaticality probe: each NA sentence (``sentence_good`` = 1, ``sentence_bad`` = 0) is traced
  primed with ``<eos>``; its features are both layers' hidden states concatenated, ``[h_L1; h_L2]``
  (2H), max-pooled over its words (the primer excluded). A feed-forward layer (2H -> 2) with a sigmoid,
  then log-softmax, is trained with NLL (Adam, full batch) on standardized features.
- (b) Diagnostic classifiers (Giulianelli et al. 2018): logistic regression on ``c_t`` and ``h_t`` of
  each layer decodes the subject's number (first letter of ``condition``: S singular, P plural) at
  every word position of the correct sentences of each construction.

Both split by pair: the two sentences of a record share its ``(construction, pairID)`` key, and a
seeded permutation of the keys of each construction sends ``heldout`` of them to the held-out side.
Accuracies are held-out accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from agreelens.model import device_of, evaluating  # noqa: E402
from agreelens.plots import save_figure  # noqa: E402
from agreelens.text import tokenize  # noqa: E402
from agreelens.trace import trace  # noqa: E402

LR = 0.01  # Adam learning rate of both probes
WEIGHT_DECAY = 1e-3  # L2 on the diagnostic classifiers
STATES = ("c", "h")
BATCH = 512  # sentences traced per pass
# added to each feature's std: many max-pooled units saturate (std 1e-12 .. 1e-3), and scaling them to
# unit variance would let float rounding (which differs between runs and machines) decide the probe
STD_FLOOR = 1e-3


def split_pairs(pairs: list[dict], heldout: float, seed: int) -> torch.Tensor:
    """(n,) bool, True = held out: ``round(heldout * keys)`` pair keys of each construction, seeded."""
    keys: dict[str, list[str]] = {}
    for p in pairs:
        keys.setdefault(p.get("construction", ""), []).append(str(p["pairID"]))
    out_keys: set[tuple[str, str]] = set()
    g = torch.Generator().manual_seed(seed)
    for cons in sorted(keys):
        uniq = sorted(set(keys[cons]))
        perm = torch.randperm(len(uniq), generator=g).tolist()
        out_keys |= {(cons, uniq[i]) for i in perm[: round(heldout * len(uniq))]}
    return torch.tensor([(p.get("construction", ""), str(p["pairID"])) in out_keys for p in pairs], dtype=torch.bool)


def sentence_states(model, vocab, sentences: list[str], pooled: bool, progress: bool = False):
    """Trace ``<eos> + words`` of each sentence, grouped by length (no padding).

    ``pooled``: (n, layers*H), the max over words of ``[h_L1; h_L2; ...]``. Otherwise (sentences of
    one length T): ``{"L1.c": (n, T, H), "L1.h": ..., "L2.c": ...}``, every word's c and h."""
    device = device_of(model)
    seqs = [[vocab.eos, *vocab.encode(tokenize(s))] for s in sentences]
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    if not pooled and len(by_len) > 1:
        raise ValueError(f"per-position states need one sentence length, got lengths {sorted(by_len)}")
    batches = [idx[k : k + BATCH] for _, idx in sorted(by_len.items()) for k in range(0, len(idx), BATCH)]
    parts: list[tuple[list[int], object]] = []
    with evaluating(model):
        for idx in tqdm(batches, desc="tracing", disable=not progress, leave=False):
            tr = trace(model, torch.tensor([seqs[i] for i in idx], device=device).t())
            if pooled:  # h (layers, T, B, H) -> words only, max over time -> (B, layers*H)
                parts.append((idx, tr.h[:, 1:].float().amax(1).permute(1, 0, 2).reshape(len(idx), -1)))
            else:
                parts.append((idx, {f"L{k + 1}.{s}": getattr(tr, s)[k, 1:].float().transpose(0, 1)
                                    for s in STATES for k in range(tr.h.size(0))}))
        order = torch.tensor([i for idx, _ in parts for i in idx]).argsort().to(device)
        if pooled:
            return torch.cat([x for _, x in parts])[order]
        return {name: torch.cat([x[name] for _, x in parts])[order] for name in sorted(parts[0][1])}


def _standardize(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Center and scale by the training rows' mean and std (rows on dimension -2)."""
    ref = x[..., train, :]
    return (x - ref.mean(-2, keepdim=True)) / (ref.std(-2, keepdim=True) + STD_FLOOR)


def train_classifier(x: torch.Tensor, y: torch.Tensor, heldout: torch.Tensor, steps: int = 300) -> dict:
    """Probe (a) on pooled features ``x`` (n, D), labels ``y`` (n,) in {0, 1}: Linear -> sigmoid ->
    log-softmax, NLL, Adam full batch on the training rows. Returns ``{"accuracy", "n_train",
    "n_heldout", "pred"}`` (``pred``: (n,) predicted labels of every row)."""
    train = ~heldout
    x = _standardize(x.float(), train)
    y = y.long().to(x.device)
    head = torch.nn.Linear(x.size(1), 2).to(x.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=LR)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            logp = torch.log_softmax(torch.sigmoid(head(x[train])), -1)
            torch.nn.functional.nll_loss(logp, y[train]).backward()
            opt.step()
    with torch.no_grad():
        pred = head(x).argmax(-1)
    acc = (pred[heldout] == y[heldout]).float().mean().item() if heldout.any() else float("nan")
    return {"accuracy": acc, "n_train": int(train.sum()), "n_heldout": int(heldout.sum()), "pred": pred.cpu()}


def diagnostic(x: torch.Tensor, y: torch.Tensor, heldout: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """K logistic regressions at once on ``x`` (K, n, D), labels ``y`` (n,) in {0, 1} (Adam, full
    batch, L2 ``WEIGHT_DECAY``). Returns the (K,) held-out accuracies."""
    train = ~heldout
    x = _standardize(x.float(), train)
    y = y.float().to(x.device)
    w = torch.zeros(x.size(0), x.size(2), device=x.device, requires_grad=True)
    b = torch.zeros(x.size(0), 1, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=LR, weight_decay=WEIGHT_DECAY)
    xt, yt = x[:, train], y[train].expand(x.size(0), -1)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            logits = torch.einsum("knd,kd->kn", xt, w) + b
            # sum over classifiers: each one's gradient is its own mean loss
            torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none").mean(1).sum().backward()
            opt.step()
    with torch.no_grad():
        pred = (torch.einsum("knd,kd->kn", x[:, heldout], w) + b) > 0
    return (pred == y[heldout].bool()).float().mean(1).cpu()


def probe(model, vocab, pairs: list[dict], heldout: float = 0.25, steps: int = 300, seed: int = 1,
          progress: bool = False) -> dict:
    """Both probes on the NA pairs. Returns ``{"features", "heldout", "steps", "seed", "classifier":
    {"accuracy", "n_train", "n_heldout", "constructions": {c: {"accuracy", "n"}}}, "diagnostic": {c:
    {"words", "subject", "verb", "n_train", "n_heldout", "accuracy": {"L1.c": [per word], ...}}}}``."""
    out_mask = split_pairs(pairs, heldout, seed)
    n = len(pairs)
    # (a): good sentences, then bad ones; a pair's two rows share its side of the split
    x = sentence_states(model, vocab, [p["sentence_good"] for p in pairs] + [p["sentence_bad"] for p in pairs],
                        pooled=True, progress=progress)
    y = torch.cat([torch.ones(n), torch.zeros(n)])
    res = train_classifier(x, y, torch.cat([out_mask, out_mask]).to(x.device), steps)
    cons_of = [p.get("construction", "") for p in pairs] * 2
    ok = res.pop("pred") == y.long()
    held = torch.cat([out_mask, out_mask])
    res["constructions"] = {}
    for cons in dict.fromkeys(cons_of):
        sel = torch.tensor([c == cons for c in cons_of]) & held
        res["constructions"][cons] = {"accuracy": ok[sel].float().mean().item() if sel.any() else float("nan"),
                                      "n": int(sel.sum())}
    # (b): per construction, the correct sentences, every word's c and h of each layer
    diag: dict[str, dict] = {}
    for cons in tqdm(list(dict.fromkeys(cons_of[:n])), desc="diagnostic", disable=not progress, leave=False):
        idx = [i for i, p in enumerate(pairs) if p.get("construction", "") == cons]
        states = sentence_states(model, vocab, [pairs[i]["sentence_good"] for i in idx], pooled=False)
        names = list(states)  # L1.c, L1.h, L2.c, ...
        xs = torch.stack([states[k] for k in names])  # (S, m, T, H)
        S, m, T, H = xs.shape
        labels = torch.tensor([pairs[i]["condition"][0] == "P" for i in idx], dtype=torch.long)
        held_c = out_mask[idx].to(xs.device)
        acc = diagnostic(xs.permute(0, 2, 1, 3).reshape(S * T, m, H), labels, held_c, steps).view(S, T)
        first = pairs[idx[0]]
        diag[cons] = {"words": tokenize(first["sentence_good"]), "subject": 1,
                      "verb": len(tokenize(first["one_prefix_prefix"])), "n_train": int((~held_c).sum()),
                      "n_heldout": int(held_c.sum()), "accuracy": {k: acc[s].tolist() for s, k in enumerate(names)}}
    return {"features": "[h_L1; h_L2] (both layers' hidden states)", "heldout": heldout,
            "steps": steps, "seed": seed, "classifier": res, "diagnostic": diag}


def plot_probe(result: dict, path: str | Path, title: str = "") -> Path:
    """One panel per construction (diagnostic accuracy per word, one line per layer and state), then
    a bar panel of probe (a)'s held-out accuracy per construction."""
    diag = result["diagnostic"]
    cols = 4
    rows = (len(diag) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    styles = {"c": "-", "h": "--"}
    for ax, (cons, d) in zip(flat, diag.items()):
        x = list(range(len(d["words"])))
        for name, acc in d["accuracy"].items():
            layer, state = name.split(".")
            ax.plot(x, acc, ls=styles[state], marker="o", ms=3, lw=1.5, label=f"{layer} {state}",
                    color="tab:green" if layer == "L1" else "tab:purple")
        ax.axvline(d["verb"], color="gray", lw=0.8, ls=":")
        ax.axhline(0.5, color="black", lw=0.6, ls=":")
        ax.set_ylim(0.3, 1.03)
        ax.set_xticks(x)
        ax.set_xticklabels(d["words"], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{cons}: subject number (n={d['n_heldout']})", fontsize=9)
        ax.grid(alpha=0.3)
    flat[0].legend(fontsize=7)
    bar = flat[len(diag)]
    cl = result["classifier"]["constructions"]
    bar.bar(range(len(cl)), [v["accuracy"] for v in cl.values()], color="tab:orange")
    bar.axhline(0.5, color="black", lw=0.6, ls=":")
    bar.set_xticks(range(len(cl)))
    bar.set_xticklabels(list(cl), rotation=45, ha="right", fontsize=7)
    bar.set_ylim(0, 1)
    bar.set_title(f"(a) good vs bad, held-out {result['classifier']['accuracy']:.0%}", fontsize=9)
    for ax in flat[len(diag) + 1 :]:
        ax.axis("off")
    return save_figure(fig, path, title)


def verb_decoding(result: dict) -> dict[str, dict]:
    """Per construction, the best (layer, state) decoding of the subject's number at the word before
    the verb (the state that predicts it) and at the verb: ``{c: {"before": (acc, name), "at": ...}}``."""
    out = {}
    for cons, d in result["diagnostic"].items():
        best = {}
        for key, pos in (("before", d["verb"] - 1), ("at", d["verb"])):
            best[key] = max((acc[pos], name) for name, acc in d["accuracy"].items())
        out[cons] = best
    return out


def run_probe(params, name: str, stimuli_dir: str | Path = "stimuli", metrics: str | Path = "metrics",
              figures: str | Path = "reports/figures", progress: bool = True) -> dict:
    """Stage ``probe``: writes ``metrics/probe_<name>.json`` and ``reports/figures/probe_<name>.png``."""
    from agreelens.ablation import _load, load_stimuli

    tag = Path(name).name
    pairs = load_stimuli(stimuli_dir)
    model, vocab = _load(params, name)
    a = params.analysis
    result = {"model": tag, **probe(model, vocab, pairs, a.probe_heldout, a.probe_steps, a.probe_seed, progress)}
    out = Path(metrics) / f"probe_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot_probe(result, Path(figures) / f"probe_{tag}.png",
               title=f"{tag}: probing classifiers (held-out {a.probe_heldout:.0%} of pairs)")
    return result
