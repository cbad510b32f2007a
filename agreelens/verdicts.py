"""From an LM's state to a verdict on an agreement site: the evidence, the subject-number readout and the
operating point.

Evidence for a site (:func:`site_evidence`, one batched LM forward for all sentences):

``margin``
    ``log P(written | prefix) - log P(alternate | prefix)`` (primed with ``<eos>`` as in training); for a
    ``there`` site the two versions of the sentence are read from the verb to the noun it agrees with and
    the margin is the difference of their log-probabilities over those words.
``readout``
    the log-odds, read linearly off the state the LM predicts the verb from (the top layer's ``h``, the
    decoder's input), that the subject is of the written form's number (:class:`Readout`, a logistic
    regression fit on NA-task pairs: the state at every word from the subject to the verb). Only verb
    and auxiliary sites have one; elsewhere it is 0.

:class:`OperatingPoint` turns evidence into a verdict: an error score ``w_margin * margin + w_readout *
readout + bias`` per site kind (a log-likelihood ratio of error to correct, fit by logistic regression on held-out
sites), ``error`` above ``error_at``, ``unsure`` above ``unsure_at`` (shown as such, never counted as an
error), else ``ok``. The thresholds are chosen on a dev set for a false-alarm budget per 100 correct
sentences (:func:`choose_operating_point`). A site whose subject the words alone decide (``quantified``,
``coordinated``) is judged by that subject's number.

With a parser, a site scoring above ``ask_at`` gets the parse rule's verdict; where the rule has none
(:data:`NO_VERDICT`: no subject found, a verb tagged as a noun), the LM's error stands only above
``alone_at`` and is ``unsure`` below it: the parser's silence is weak evidence that the sentence is unusual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from agreelens.model import device_of, evaluating
from agreelens.vocab import Vocab

EVIDENCE = ("margin", "margin+readout")
NO_VERDICT = -1  # the parse rule was asked about a site and had no verdict


# ---------------------------------------------------------------------------------------- readout


@dataclass
class Readout:
    """``P(plural subject) = sigmoid(((h - mean) / std) @ w + b)`` on the top layer's h."""

    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    state: str = "L2.h"
    heldout_accuracy: float = 0.0
    n_train: int = 0

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float().cpu()
        return ((h - self.mean) / self.std) @ self.w + self.b

    def to_dict(self) -> dict:
        return {"state": self.state, "heldout_accuracy": self.heldout_accuracy, "n_train": self.n_train,
                "b": round(float(self.b), 6), **{k: [round(float(x), 6) for x in getattr(self, k)]
                                                 for k in ("mean", "std", "w")}}

    @classmethod
    def from_dict(cls, d: dict) -> "Readout":
        t = lambda k: torch.tensor(d[k], dtype=torch.float32)  # noqa: E731
        return cls(t("mean"), t("std"), t("w"), torch.tensor(float(d["b"])), d.get("state", "L2.h"),
                   float(d.get("heldout_accuracy", 0.0)), int(d.get("n_train", 0)))


def fit_readout(model: nn.Module, vocab: Vocab, pairs: list[dict], steps: int = 100) -> Readout | None:
    """Logistic regression of the subject's number (plural = 1, from the pair's ``condition``) on the top
    layer's h at every word from the subject to the one before the verb, over NA-task pairs (one-prefix
    fields); a fifth of the pairs (by a hash of ``pairID``) is held out for ``heldout_accuracy``."""
    import zlib

    from agreelens.text import tokenize
    from agreelens.trace import lstm_of, trace

    if len({p["condition"][0] for p in pairs}) < 2:
        return None
    layers = lstm_of(model).num_layers
    by_len: dict[int, list[dict]] = {}
    for p in pairs:
        by_len.setdefault(len(tokenize(p["sentence_good"])), []).append(p)
    xs, ys, held = [], [], []
    device = device_of(model)
    with evaluating(model):
        for group in by_len.values():
            ids = torch.tensor([[vocab.eos, *vocab.encode(tokenize(p["sentence_good"]))] for p in group],
                               device=device).t()
            h = trace(model, ids).h[min(layers, 2) - 1].float().cpu()  # (T, B, H)
            for b, p in enumerate(group):
                verb = len(tokenize(p["one_prefix_prefix"]))  # word index of the verb
                for w in range(1, verb):  # subject .. the word before the verb (state after reading it)
                    xs.append(h[w + 1, b])
                    ys.append(float(p["condition"][0] == "P"))
                    held.append(zlib.crc32(str(p["pairID"]).encode()) % 5 == 0)
    x, y, held_t = torch.stack(xs), torch.tensor(ys), torch.tensor(held)
    if held_t.all() or not held_t.any():
        held_t = torch.arange(len(ys)) % 5 == 0
    train = ~held_t
    mean, std = x[train].mean(0), x[train].std(0) + 1e-3
    z = (x - mean) / std
    w, b = _logistic(z[train], y[train], l2=1e-3, steps=steps)
    acc = float((((z[held_t] @ w + b) > 0).float() == y[held_t]).float().mean())
    return Readout(mean, std, w, b, f"L{min(layers, 2)}.h", round(acc, 4), int(train.sum()))


def _logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 100,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of an L2-regularised logistic regression (LBFGS)."""
    w = torch.zeros(x.size(1), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


# ---------------------------------------------------------------------------------------- evidence


def word_margin(model: nn.Module, features: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``log P(good) - log P(bad)`` from features (N, H): ``model.target_margin`` where the model has one
    (only the two words' logits), else two of ``model.target_log_probs``."""
    if hasattr(model, "target_margin"):
        return model.target_margin(features, good, bad)
    lp = model.target_log_probs(features.unsqueeze(1).expand(-1, 2, -1), torch.stack([good, bad], 1))
    return lp[:, 0] - lp[:, 1]


def site_evidence(model: nn.Module, vocab: Vocab, sentences: list[list[str]], sites: list[tuple[int, object]],
                  readout: Readout | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(margin, readout)`` (float64, CPU, in the order of ``sites``) for sites ``(sentence index, Site)``.

    One forward per batch of sentences (longest first); a ``there`` site adds its sentence with the verb
    swapped to the batch and compares the two over the words from the verb to ``span_end``."""
    n = len(sites)
    margin = torch.zeros(n, dtype=torch.float64)
    ro = torch.zeros(n, dtype=torch.float64)
    if not n:
        return margin, ro
    device = device_of(model)
    seqs: list[list[str]] = list(sentences)
    swapped: dict[int, int] = {}  # site -> index of the swapped sentence
    for k, (s, site) in enumerate(sites):
        if site.span_end is not None:
            toks = list(sentences[s])
            toks[site.position] = site.alternate
            swapped[k] = len(seqs)
            seqs.append(toks)
    asks: dict[int, list[int]] = {}
    for k, (s, _) in enumerate(sites):
        asks.setdefault(s, []).append(k)
        if k in swapped:
            asks.setdefault(swapped[k], [])
    order = sorted(asks, key=lambda s: -len(seqs[s]))
    span_lp: dict[tuple[int, int], float] = {}  # (sequence, site) -> log P(words position..span_end)
    with evaluating(model):
        for lo in range(0, len(order), batch_size):
            chunk = order[lo:lo + batch_size]
            col = {s: j for j, s in enumerate(chunk)}
            ids = pad_sequence([torch.tensor([vocab.eos, *vocab.encode(seqs[s])], dtype=torch.long) for s in chunk],
                               padding_value=vocab.eos).to(device)  # (T, B)
            features, _ = model(ids)
            plain = [k for s in chunk for k in asks[s] if k not in swapped]
            if plain:
                t = torch.tensor([sites[k][1].position for k in plain], device=device)
                b = torch.tensor([col[sites[k][0]] for k in plain], device=device)
                feats = features[t, b]
                good = torch.tensor([vocab.stoi[sites[k][1].word] for k in plain], device=device)
                bad = torch.tensor([vocab.stoi[sites[k][1].alternate] for k in plain], device=device)
                margin[torch.tensor(plain)] = word_margin(model, feats, good, bad).double().cpu()
                if readout is not None:
                    sign = torch.tensor([1.0 if sites[k][1].number == "plural" else -1.0 for k in plain])
                    keep = torch.tensor([sites[k][1].kind not in ("noun",) for k in plain], dtype=torch.float64)
                    ro[torch.tensor(plain)] = (readout.logit(feats) * sign).double() * keep
            for k, sw in swapped.items():  # there sites: both versions over position..span_end
                site = sites[k][1]
                for seq in (sites[k][0], sw):
                    if seq not in col:
                        continue
                    pos = torch.arange(site.position, site.span_end + 1, device=device)
                    tgt = ids[pos + 1, col[seq]]
                    span_lp[seq, k] = float(model.target_log_probs(features[pos, col[seq]], tgt).sum())
    for k, sw in swapped.items():
        margin[k] = span_lp[sites[k][0], k] - span_lp[sw, k]
    return margin, ro


# ---------------------------------------------------------------------------------------- operating point


@dataclass
class OperatingPoint:
    """Error score ``w_margin * margin + w_readout * readout + bias`` with weights per site kind
    (``weights[kind]``, else ``weights["*"]``); ``error`` above ``error_at``, ``unsure`` above
    ``unsure_at`` (None: no unsure band), else ``ok``. Fit per kind, the score is a log-likelihood ratio
    of error to correct, so one threshold serves every kind."""

    evidence: str = "margin"
    weights: dict = field(default_factory=lambda: {"*": [-1.0, 0.0, 0.0]})
    error_at: float = 0.0
    unsure_at: float | None = None
    expected: dict = field(default_factory=dict)  # false alarms / catches measured on a held-out set
    ask_at: float | None = None  # with a parser: a site scoring above this gets the parse rule's verdict
    alone_at: float | None = None  # ... and where the rule has none, an error only above this (else unsure)

    @classmethod
    def from_threshold(cls, threshold: float, scale: float = 1.0) -> "OperatingPoint":
        """Error iff margin < threshold; the score is ``scale * (threshold - margin)``."""
        return cls("margin", {"*": [-scale, 0.0, scale * threshold]}, 0.0, None)

    @property
    def uses_readout(self) -> bool:
        return any(w[1] for w in self.weights.values())

    def score(self, margin, readout=0.0, kind: str = "*"):
        wm, wr, b = self.weights.get(kind, self.weights["*"])
        return wm * margin + wr * readout + b

    def scores(self, margin: torch.Tensor, readout: torch.Tensor, kinds: list[str]) -> torch.Tensor:
        """:meth:`score` of many sites at once (float64)."""
        out = torch.empty(len(kinds), dtype=torch.float64)
        for kind in set(kinds):
            sel = torch.tensor([k == kind for k in kinds], dtype=torch.bool)
            out[sel] = self.score(margin[sel].double(), readout[sel].double(), kind)
        return out

    def asks(self, score: float) -> bool:
        """Does a site of this score go to the parse rule (when one is installed)?"""
        return self.ask_at is not None and score > self.ask_at

    def verdict(self, score: float, rule: int | None = None) -> tuple[str, float | None]:
        """``(verdict, confidence)``: confidence is the score's probability of the verdict's side; a site
        the parse rule decides (``rule``: 1 error, 0 correct, :data:`NO_VERDICT` asked without a verdict,
        None not asked) has none."""
        if rule in (0, 1) and self.asks(score):
            return ("error" if rule else "ok"), None
        p = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, score))))
        if score > self.error_at:
            if rule == NO_VERDICT and self.alone_at is not None and score <= self.alone_at:  # only asked sites have it
                return "unsure", p
            return "error", p
        if self.unsure_at is not None and score > self.unsure_at:
            return "unsure", p
        return "ok", 1.0 - p

    def margin_threshold(self) -> float | None:
        """The margin below which a site is an error (one margin-only weight for all kinds), else None."""
        if len(self.weights) != 1 or self.uses_readout or not self.weights["*"][0]:
            return None
        wm, _, b = self.weights["*"]
        return (self.error_at - b) / wm

    def to_dict(self) -> dict:
        r = lambda x: None if x is None else round(float(x), 6)  # noqa: E731
        return {"evidence": self.evidence, "weights": {k: [r(x) for x in w] for k, w in self.weights.items()},
                "error_at": r(self.error_at), "unsure_at": r(self.unsure_at), "ask_at": r(self.ask_at),
                "alone_at": r(self.alone_at), "expected": self.expected}

    @classmethod
    def from_dict(cls, d: dict) -> "OperatingPoint":
        opt = lambda k: None if d.get(k) is None else float(d[k])  # noqa: E731
        return cls(d.get("evidence", "margin"), {k: [float(x) for x in w] for k, w in d["weights"].items()},
                   float(d["error_at"]), opt("unsure_at"), d.get("expected", {}), opt("ask_at"), opt("alone_at"))


def rates(flags: torch.Tensor, sentence_of: torch.Tensor, n_sentences: int) -> float:
    """Sentences with at least one flagged site, per 100 of ``n_sentences``."""
    if not n_sentences:
        return 0.0
    hit = torch.zeros(n_sentences, dtype=torch.bool)
    hit[sentence_of[flags]] = True
    return 100.0 * float(hit.sum()) / n_sentences


def threshold_for_budget(scores: torch.Tensor, sentence_of: torch.Tensor, n_sentences: int,
                         budget: float) -> float:
    """The lowest score threshold at which at most ``budget`` of 100 correct sentences have a site
    scoring above it (a sentence counts once, at its highest-scoring site)."""
    if not n_sentences or not len(scores):
        return 0.0
    top = torch.full((n_sentences,), -math.inf, dtype=torch.float64)
    top = top.scatter_reduce(0, sentence_of, scores.double(), reduce="amax")
    allowed = int(math.floor(budget * n_sentences / 100.0 + 1e-9))
    ranked = top.sort(descending=True).values
    if allowed >= n_sentences:
        return -1e9
    cut = float(ranked[allowed])  # the (allowed+1)-th highest sentence must not be flagged
    return cut if math.isfinite(cut) else -1e9


MIN_KIND_EXAMPLES = 30  # a site kind with fewer dev errors (or correct sites) shares the pooled weights


def fit_weights(evidence: str, ok: dict, err: dict) -> dict:
    """``{kind: [w_margin, w_readout, bias]}`` (and ``"*"``, pooled): logistic regression of error (1) vs
    correct (0) sites with both classes weighted equally, on the evidence named (``margin`` or
    ``margin+readout``); ``ok``/``err`` hold ``margin``, ``readout`` tensors and a ``kind`` list."""
    cols = ["margin"] + (["readout"] if evidence == "margin+readout" else [])

    def fit(sel_ok, sel_err):
        x = torch.cat([torch.stack([ok[c][sel_ok] for c in cols], 1), torch.stack([err[c][sel_err] for c in cols], 1)])
        n0, n1 = int(sel_ok.sum()), int(sel_err.sum())
        y = torch.cat([torch.zeros(n0), torch.ones(n1)])
        weight = torch.where(y > 0, 0.5 * len(y) / max(1, n1), 0.5 * len(y) / max(1, n0))
        w, b = _logistic(x.float(), y, l2=1e-4, steps=200, weight=weight)
        return [float(w[0]), float(w[1]) if len(cols) > 1 else 0.0, float(b)]

    all_ok = torch.ones(len(ok["margin"]), dtype=torch.bool)
    all_err = torch.ones(len(err["margin"]), dtype=torch.bool)
    weights = {"*": fit(all_ok, all_err)}
    for kind in sorted(set(ok["kind"]) & set(err["kind"])):
        sel_ok = torch.tensor([k == kind for k in ok["kind"]], dtype=torch.bool)
        sel_err = torch.tensor([k == kind for k in err["kind"]], dtype=torch.bool)
        if min(int(sel_ok.sum()), int(sel_err.sum())) >= MIN_KIND_EXAMPLES:
            weights[kind] = fit(sel_ok, sel_err)
    return weights


def choose_operating_point(ok: dict, err: dict, ok_sentence: torch.Tensor, n_ok: int, n_errors: int,
                           budget: float, unsure_budget: float, evidences=EVIDENCE,
                           fixed_ok: torch.Tensor | None = None) -> tuple[OperatingPoint, dict]:
    """The evidence and thresholds that catch the most errors at ``budget`` false alarms per 100 correct
    sentences, on a dev set: ``ok`` holds every site of the correct sentences (``margin``, ``readout``,
    ``kind``; ``ok_sentence`` their sentence), ``err`` the swapped sites found (``n_errors`` errors in all,
    found or not). ``fixed_ok``: sites whose verdict is not the LM's (+inf: flagged, -inf: not, nan: the
    LM's); they take part in the false alarms only. ``unsure_at`` is the threshold of ``unsure_budget``.
    Returns the point and, per evidence, its dev false alarms and catches."""
    fixed = fixed_ok if fixed_ok is not None else torch.full((len(ok["kind"]),), math.nan, dtype=torch.float64)
    free = torch.isnan(fixed)
    table, best = {}, None
    for ev in evidences:
        weights = fit_weights(ev, {k: (v[free] if torch.is_tensor(v) else [x for x, f in zip(v, free) if f])
                                   for k, v in ok.items()}, err)
        op = OperatingPoint(ev, weights)
        s_ok = torch.where(free, op.scores(ok["margin"], ok["readout"], ok["kind"]), fixed.clamp(-1e9, 1e9))
        s_err = op.scores(err["margin"], err["readout"], err["kind"])
        op.error_at = threshold_for_budget(s_ok, ok_sentence, n_ok, budget)
        t_uns = threshold_for_budget(s_ok, ok_sentence, n_ok, unsure_budget)
        op.unsure_at = t_uns if t_uns < op.error_at else None
        caught = 100.0 * float((s_err > op.error_at).sum()) / max(1, n_errors)
        table[ev] = {"false_alarms_per_100": round(rates(s_ok > op.error_at, ok_sentence, n_ok), 2),
                     "caught_per_100": round(caught, 2), "weights": op.to_dict()["weights"]}
        if best is None or caught > best[0] + 1e-9:
            best = (caught, op)
    return best[1], table
