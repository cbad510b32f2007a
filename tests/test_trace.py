"""Exact LSTM tracing: traced states equal nn.LSTM's, a unit mask equals zeroing the unit's outgoing
weights, hooks patch activations, unit numbering round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

from agreelens.config import ModelConfig
from agreelens.model import RNNModel
from agreelens.trace import (
    layer_index_to_unit,
    parse_units,
    run,
    run_layer,
    run_with_cache,
    trace,
    unit_mask,
    unit_to_layer_index,
)

V, E, H, T, B = 40, 10, 16, 7, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def make_model(softmax="full", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(emb_size=E, hidden_size=H, layers=2, dropout=0.2, softmax=softmax, cutoffs=[10, 25])
    model = RNNModel(V, cfg).eval()
    with torch.no_grad():  # biases non-zero and weights large enough for saturating gates to matter
        for p in model.rnn.parameters():
            p.uniform_(-0.6, 0.6)
    return model


def zero_outgoing(model, unit):
    """A deep copy with the unit's outgoing weights zeroed: its column in weight_hh of its layer and in
    weight_ih of the next layer, or in the decoder's inputs for the top layer."""
    m = copy.deepcopy(model)
    layer, j = unit_to_layer_index(unit, H, 2)
    with torch.no_grad():
        getattr(m.rnn, f"weight_hh_l{layer - 1}")[:, j] = 0
        if layer < 2:
            getattr(m.rnn, f"weight_ih_l{layer}")[:, j] = 0
        elif softmax_of(m) == "adaptive":
            m.decoder.head.weight[:, j] = 0
            for tail in m.decoder.tail:
                tail[0].weight[:, j] = 0
        else:
            m.decoder.weight[:, j] = 0
    return m


def softmax_of(model):
    return model.cfg.softmax


def ids_and_hidden(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (T, B), generator=g)
    hidden = (torch.randn(2, B, H, generator=g) * 0.5, torch.randn(2, B, H, generator=g) * 0.5)
    return ids, hidden


@pytest.mark.parametrize("with_hidden", [False, True])
def test_traced_states_equal_nn_lstm(with_hidden):
    model = make_model()
    ids, hidden = ids_and_hidden()
    hidden = hidden if with_hidden else None
    with torch.no_grad():
        out, (h_n, c_n) = model.rnn(model.encoder(ids), hidden)
        tr = trace(model, ids, hidden)
    assert tr.h.shape == tr.c.shape == tr.i.shape == (2, T, B, H)
    assert torch.allclose(tr.h[1], out, atol=1e-5)
    assert torch.allclose(tr.features, out, atol=1e-5)
    assert torch.allclose(tr.hidden[0], h_n, atol=1e-5) and torch.allclose(tr.hidden[1], c_n, atol=1e-5)
    assert torch.allclose(tr.h[:, -1], h_n, atol=1e-5) and torch.allclose(tr.c[:, -1], c_n, atol=1e-5)
    # the LSTM equations hold between the traced activations
    c_prev = torch.cat([(hidden[1] if hidden else torch.zeros(2, B, H)).unsqueeze(1), tr.c[:, :-1]], 1)
    assert torch.allclose(tr.c, tr.f * c_prev + tr.i * tr.g, atol=1e-6)
    assert torch.allclose(tr.h, tr.o * tr.c.tanh(), atol=1e-6)
    assert float(tr.i.min()) >= 0 and float(tr.i.max()) <= 1 and float(tr.g.abs().max()) <= 1
    # and the model's own forward in eval mode (dropout off) gives the same features
    features, _ = model(ids, hidden)
    assert torch.allclose(tr.features, features, atol=1e-5)


def test_run_layer_reuses_lower_layer_outputs():
    model = make_model()
    ids, _ = ids_and_hidden()
    with torch.no_grad():
        tr = trace(model, ids)
        layer1, (h1, c1) = run_layer(model, 1, model.encoder(ids), keep="icfh")
        layer2, _ = run_layer(model, 2, layer1["h"], keep="hc")
    assert torch.allclose(layer1["h"], tr.h[0], atol=1e-6) and torch.allclose(layer1["c"], tr.c[0], atol=1e-6)
    assert torch.allclose(h1, tr.h[0, -1]) and torch.allclose(c1, tr.c[0, -1])
    assert torch.allclose(layer2["h"], tr.h[1], atol=1e-6) and set(layer2) == {"h", "c"}


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
@pytest.mark.parametrize("unit", [3, H + 5])  # a layer-1 and a layer-2 unit
def test_mask_equals_zeroed_outgoing_weights(softmax, unit):
    model = make_model(softmax)
    ablated = zero_outgoing(model, unit)
    ids, hidden = ids_and_hidden()
    targets = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mask = unit_mask([unit], H, 2)
        features, _, (h_n, c_n) = run(model, ids, hidden, mask=mask)
        want, (wh, wc) = ablated(ids, hidden)
        assert torch.allclose(features, want * mask[H:], atol=1e-5)  # the decoder ignores the unit's h
        assert torch.allclose(h_n, wh, atol=1e-5) and torch.allclose(c_n, wc, atol=1e-5)
        got_lp = model.target_log_probs(features, targets)
        want_lp = ablated.target_log_probs(want, targets)
        assert torch.allclose(got_lp, want_lp, atol=1e-5)
        full, _ = model(ids, hidden)
        assert not torch.allclose(model.target_log_probs(full, targets), want_lp, atol=1e-3)  # it mattered


def test_per_column_masks():
    """One mask per batch column equals running each column with its own ablation."""
    model = make_model("adaptive")
    ids, _ = ids_and_hidden()
    units = [2, H + 1, None]  # column 2 not ablated
    mask = torch.stack([unit_mask([u] if u else [], H, 2) for u in units])
    with torch.no_grad():
        features, _ = run_with_cache(model, ids, names=[], mask=mask)
        for b, u in enumerate(units):
            want, _ = (zero_outgoing(model, u) if u else model)(ids[:, b : b + 1])
            assert torch.allclose(features[:, b], want[:, 0] * mask[b, H:], atol=1e-5)


def test_hooks_patch_activations():
    model = make_model()
    ids, _ = ids_and_hidden()
    seen = []

    def record(x, t):
        seen.append((t, tuple(x.shape)))  # returns None: no change

    def kill_output_gate(x, t):
        return torch.zeros_like(x) if t == 3 else None

    with torch.no_grad():
        base, cache = run_with_cache(model, ids)
        same, _ = run_with_cache(model, ids, names=["L1.h"], hooks={"L1.f": record})
        patched, pc = run_with_cache(model, ids, hooks=[("L2.o", kill_output_gate)])
    assert set(cache) == {f"L{n}.{k}" for n in (1, 2) for k in "ifgoch"}
    assert seen == [(t, (B, H)) for t in range(T)]
    assert torch.equal(same, base)
    assert torch.all(pc["L2.o"][3] == 0) and torch.all(pc["L2.h"][3] == 0) and torch.all(patched[3] == 0)
    assert torch.equal(patched[:3], base[:3]) and not torch.allclose(patched[4:], base[4:])
    assert torch.equal(pc["L1.h"], cache["L1.h"])  # layer 1 does not read layer 2
    with pytest.raises(ValueError, match="unknown activation 'L3.h'"):
        run_with_cache(model, ids, names=["L3.h"])


def test_unit_numbering_round_trips_and_rejects_bad_units():
    assert unit_to_layer_index(776, 650) == (2, 125)
    assert unit_to_layer_index(988, 650) == (2, 337)
    assert unit_to_layer_index(1, 650) == (1, 0) and unit_to_layer_index(650, 650) == (1, 649)
    assert unit_to_layer_index(651, 650) == (2, 0) and unit_to_layer_index(1300, 650) == (2, 649)
    for u in range(1, 2 * 7 + 1):
        assert layer_index_to_unit(*unit_to_layer_index(u, 7), 7) == u
    for bad in (0, -1, 1301, 2.5, True):
        with pytest.raises(ValueError, match=r"units are 1\.\.1300 \(layer 1: 1\.\.650, layer 2: 651\.\.1300\)"):
            unit_to_layer_index(bad, 650)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        layer_index_to_unit(3, 0, 650)
    with pytest.raises(ValueError, match="index 650 out of range"):
        layer_index_to_unit(1, 650, 650)
    assert parse_units("776, 988", 650) == [776, 988]
    with pytest.raises(ValueError, match=r"unit 1301 out of range: units are 1\.\.1300"):
        parse_units("776,1301", 650)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_units("776,abc", 650)
    mask = unit_mask([1, 776], 650)
    assert mask.shape == (1300,) and mask.sum() == 1298 and mask[0] == 0 and mask[775] == 0
