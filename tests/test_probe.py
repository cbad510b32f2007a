"""Probing classifiers: a toy signal is learned and shuffled labels are not, a planted number signal is
decoded only after the subject, the split keeps pairs whole, the stage's JSON and figure."""

from __future__ import annotations

import json

import pytest
import torch

from agreelens.config import ModelConfig, Params
from agreelens.model import RNNModel
from agreelens.probe import diagnostic, plot_probe, probe, run_probe, split_pairs, train_classifier, verb_decoding
from agreelens.vocab import Vocab

H = 6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(n=800, seed=0):
    """(n, T, D) noise in [-1, 1]; label 1 puts a 3 at one random step of dimension 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 7, 10, generator=g) * 2 - 1
    y = torch.randint(0, 2, (n,), generator=g)
    t = torch.randint(0, 7, (n,), generator=g)
    x[torch.arange(n)[y == 1], t[y == 1], 0] = 3.0
    return x, y


def _heldout(n, frac=0.25, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < frac


def test_classifier_learns_max_pooled_signal_and_not_shuffled_labels():
    x, y = _toy()
    held = _heldout(len(y))
    assert train_classifier(x.amax(1), y, held)["accuracy"] >= 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    r = train_classifier(x.amax(1), shuffled, held)
    assert r["accuracy"] <= 0.65 and r["n_heldout"] == int(held.sum()) and r["pred"].shape == y.shape


def test_diagnostic_decodes_planted_number_after_subject_only():
    g = torch.Generator().manual_seed(0)
    n, T, D, subject = 600, 6, 8, 2
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(T, n, D, generator=g)  # one classifier per position
    x[subject:, :, 3] += 2.0 * (2 * y.float() - 1)  # number planted from the subject on
    acc = diagnostic(x, y, _heldout(n))
    assert acc.shape == (T,)
    assert torch.all(acc[subject:] >= 0.95), acc
    assert torch.all((acc[:subject] - 0.5).abs() <= 0.12), acc


def test_split_keeps_pairs_whole_and_is_deterministic():
    pairs = [{"construction": c, "pairID": str(i)} for c in ("simple", "nounpp") for i in range(40)]
    pairs += pairs[:10]  # repeated keys land on the same side
    held = split_pairs(pairs, 0.25, seed=3)
    side: dict = {}
    for p, h in zip(pairs, held.tolist()):
        assert side.setdefault((p["construction"], p["pairID"]), h) == h
    assert sum(side.values()) == 20  # 10 of the 40 keys of each construction
    assert torch.equal(held, split_pairs(pairs, 0.25, seed=3))
    assert not torch.equal(held, split_pairs(pairs, 0.25, seed=4))


def _pairs():
    out = []
    nouns, verbs = [("boy", "boys"), ("girl", "girls")], ("likes", "like")
    for i in range(24):
        s, p = nouns[i % 2]
        for num in "SP":
            subj, good, bad = (s, verbs[0], verbs[1]) if num == "S" else (p, verbs[1], verbs[0])
            out.append({"sentence_good": f"the {subj} {good} the car", "sentence_bad": f"the {subj} {bad} the car",
                        "one_prefix_prefix": f"the {subj}", "condition": num, "construction": "simple",
                        "pairID": f"{i}{num}", "UID": "x"})
            att = nouns[(i + 1) % 2][0 if num == "S" else 1]
            out.append({"sentence_good": f"the {subj} near the {att} {good}", "construction": "nounpp",
                        "sentence_bad": f"the {subj} near the {att} {bad}", "condition": num + num,
                        "one_prefix_prefix": f"the {subj} near the {att}", "pairID": f"{i}{num}", "UID": "x"})
            for rec in out[-2:]:
                rec.update(one_prefix_word_good=good, one_prefix_word_bad=bad)
    return out


def _model():
    torch.manual_seed(0)
    return RNNModel(20, ModelConfig(emb_size=4, hidden_size=H, layers=2, dropout=0.0, softmax="full")).eval()


VOCAB = ["<eos>", "<unk>", "the", "boy", "boys", "girl", "girls", "near", "car", "likes", "like"]


def test_probe_result_shape_and_figure(tmp_path):
    r = probe(_model(), Vocab(VOCAB), _pairs(), heldout=0.25, steps=20)
    cl = r["classifier"]
    assert set(cl["constructions"]) == {"simple", "nounpp"}
    assert cl["n_heldout"] == 2 * 2 * 12 and cl["n_train"] == 2 * 96 - cl["n_heldout"]
    d = r["diagnostic"]["nounpp"]
    assert d["words"] == ["the", "boy", "near", "the", "girl", "likes"] and d["verb"] == 5 and d["subject"] == 1
    assert set(d["accuracy"]) == {"L1.c", "L1.h", "L2.c", "L2.h"} and all(len(v) == 6 for v in d["accuracy"].values())
    held = split_pairs(_pairs(), 0.25, seed=1)
    plural = sum(p["condition"][0] == "P" for p, h in zip(_pairs(), held) if h and p["construction"] == "nounpp")
    # "the": every state alike, one guess for all: the share of one number among the held-out
    assert all(min(abs(v[0] - plural / 12), abs(v[0] - 1 + plural / 12)) < 1e-6 for v in d["accuracy"].values())
    best = verb_decoding(r)["simple"]
    assert set(best) == {"before", "at"} and best["before"][0] == r["diagnostic"]["simple"]["accuracy"][best["before"][1]][1]
    assert plot_probe(r, tmp_path / "p.png").stat().st_size > 0


def test_run_probe_writes_json_and_figure(tmp_path, monkeypatch):
    from agreelens import ablation

    monkeypatch.setattr(ablation, "_load", lambda params, name: (_model(), Vocab(VOCAB)))
    (tmp_path / "stimuli").mkdir()
    for cons in ("simple", "nounpp"):
        lines = [json.dumps(p) for p in _pairs() if p["construction"] == cons]
        (tmp_path / "stimuli" / f"{cons}.jsonl").write_text("\n".join(lines) + "\n")
    p = Params.model_validate({"analysis": {"probe_steps": 10}})
    run_probe(p, "tiny", tmp_path / "stimuli", tmp_path / "metrics", tmp_path / "figures", progress=False)
    out = json.loads((tmp_path / "metrics" / "probe_tiny.json").read_text())
    assert out["model"] == "tiny" and out["steps"] == 10 and out["heldout"] == 0.25
    assert {"accuracy", "n_train", "n_heldout", "constructions"} <= set(out["classifier"])
    assert set(out["diagnostic"]) == {"simple", "nounpp"}
    assert (tmp_path / "figures" / "probe_tiny.png").stat().st_size > 0
