"""Figures of units: gate saturation with known answers, nounpp dynamics shapes, unit choice."""

from __future__ import annotations

import torch

from agreelens.config import ModelConfig, Params
from agreelens.figures import chosen_units, gate_saturation, plot_gate_saturation, plot_unit_dynamics, unit_dynamics
from agreelens.model import RNNModel
from agreelens.vocab import Vocab

H = 6


def _model():
    torch.manual_seed(0)
    return RNNModel(20, ModelConfig(emb_size=4, hidden_size=H, layers=2, dropout=0.0, softmax="full")).eval()


def test_gate_saturation_known_answers(tmp_path):
    m = _model()
    with torch.no_grad():  # layer 1: input gate pinned open, forget gate pinned shut, output gate at 0.5
        for name in ("weight_ih_l0", "weight_hh_l0"):
            getattr(m.rnn, name)[: 3 * H].zero_()
        m.rnn.bias_ih_l0[:H] = 50.0
        m.rnn.bias_ih_l0[H:2 * H] = -50.0
        m.rnn.bias_ih_l0[2 * H:3 * H] = 0.0
        m.rnn.bias_hh_l0[: 3 * H] = 0.0
    ids = torch.randint(0, 20, (50, 4))
    sat = gate_saturation(m, ids, bptt=7)
    assert sat["i"].shape == (2, 2, H)
    assert torch.all(sat["i"][1, 0] == 1) and torch.all(sat["i"][0, 0] == 0)  # always right-saturated
    assert torch.all(sat["f"][0, 0] == 1) and torch.all(sat["f"][1, 0] == 0)  # always left-saturated
    assert torch.all(sat["o"][:, 0] == 0)  # 0.5: neither
    assert torch.all(sat["i"].sum(0) <= 1)  # a step is never both
    assert plot_gate_saturation(sat, tmp_path / "s.png", highlight=[1, H + 2]).stat().st_size > 0


def test_unit_dynamics_means_per_condition(tmp_path):
    m = _model()
    vocab = Vocab(["<eos>", "<unk>", "the", "boy", "boys", "near", "car", "cars", "likes", "like"])
    pairs = [{"sentence_good": s, "condition": c} for s, c in
             [("the boy near the car likes", "SS"), ("the boy near the cars likes", "SP"),
              ("the boys near the car like", "PS"), ("the boys near the cars like", "PP"),
              ("the boy near the car likes", "SS")]]
    dyn = unit_dynamics(m, vocab, pairs, [2, H + 1])
    assert dyn["words"] == ["the", "boy", "near", "the", "car", "likes"] and dyn["n"]["SS"] == 2
    ss = dyn["units"][2]["SS"]
    assert set(ss) == {"c", "h", "i", "f"} and all(len(v) == 6 for v in ss.values())
    # identical sentences: same trajectory; SS vs SP share the words up to the attractor
    assert dyn["units"][2]["SS"]["c"][:4] == dyn["units"][2]["SP"]["c"][:4]
    assert dyn["units"][2]["SS"]["c"][4] != dyn["units"][2]["SP"]["c"][4]
    assert plot_unit_dynamics(dyn, tmp_path / "u.png").stat().st_size > 0


def test_chosen_units_top_then_named_without_duplicates():
    p = Params.model_validate({"analysis": {"top_units": 2, "units": [7, 3]}})
    sweep = {"number_units": [{"unit": 3}, {"unit": 9}, {"unit": 1}], "drops": {}}
    assert chosen_units(p, sweep) == [3, 9, 7]
    none = {"number_units": [], "drops": {"1": [0.0, 2.0], "2": [5.0, 1.0], "3": [0.5, 0.5]}}
    assert chosen_units(p, none) == [2, 1, 7, 3]  # no number unit: the largest drops stand in
