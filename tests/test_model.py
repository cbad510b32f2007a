import pytest
import torch

from agreelens.config import ModelConfig
from agreelens.model import RNNModel, device_of, evaluating, load_model, save_model
from agreelens.vocab import Vocab

V = 300


def _model(softmax):
    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=16, hidden_size=24, layers=2, dropout=0.2, softmax=softmax, cutoffs=[50, 150])
    return RNNModel(V, cfg).eval()


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_shapes_and_target_log_probs_match_full_distribution(softmax):
    m = _model(softmax)
    x = torch.randint(0, V, (7, 3))
    feats, (h, c) = m(x)
    assert feats.shape == (7, 3, 24) and h.shape == c.shape == (2, 3, 24)
    logp = m.log_probs(feats)
    assert logp.shape == (7, 3, V)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(7, 3), atol=1e-4)  # a distribution
    y = torch.randint(0, V, (7, 3))
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(m.target_log_probs(feats, y), picked, atol=1e-5)
    assert torch.allclose(m.loss(feats, y), -picked.mean(), atol=1e-5)


def test_hidden_state_carry_over_equals_one_long_pass():
    m = _model("adaptive")
    x = torch.randint(0, V, (10, 2))
    whole, _ = m(x)
    first, hid = m(x[:4])
    second, _ = m(x[4:], hid)
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-6)


def test_save_load_roundtrip_is_tensor_only(tmp_path):
    m = _model("adaptive")
    vocab = Vocab(["<eos>", "<unk>"] + [f"w{i}" for i in range(V - 2)])
    out = save_model(m, vocab, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    m2, v2 = load_model(out)
    x = torch.randint(0, V, (5, 2))
    assert torch.equal(m(x)[0], m2(x)[0])
    assert v2.itos == vocab.itos
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_target_margin_equals_difference_of_log_probs(softmax):
    """Normalisers cancel: head/head, tail/tail (same cluster) and cross-cluster pairs all agree."""
    m = _model(softmax)
    feats, _ = m(torch.randint(0, V, (1, 12)))
    feats = feats[0]
    good = torch.tensor([3, 60, 160, 10, 70, 299, 49, 100, 200, 5, 55, 250])
    bad = torch.tensor([7, 90, 290, 120, 20, 151, 0, 149, 11, 6, 56, 251])
    lp = m.log_probs(feats)
    want = lp[torch.arange(12), good] - lp[torch.arange(12), bad]
    assert torch.allclose(m.target_margin(feats, good, bad), want, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_sets_eval_and_inference_mode_and_restores(training):
    m = _model("full").train(training)
    with evaluating(m) as inside:
        assert inside is m and not m.training and not any(x.training for x in m.modules())
        assert torch.is_inference_mode_enabled()
    assert m.training == training and all(x.training == training for x in m.modules())
    assert not torch.is_inference_mode_enabled()
    with pytest.raises(RuntimeError, match="boom"), evaluating(m):
        raise RuntimeError("boom")
    assert m.training == training


def test_device_of():
    assert device_of(_model("full")) == torch.device("cpu")
    holder = torch.nn.Module()
    assert device_of(holder) == torch.device("cpu")  # neither parameters nor buffers
    holder.register_buffer("table", torch.zeros(2, device="meta"))
    assert device_of(holder) == torch.device("meta")  # a buffer-only model: the buffer's device


def test_lstm_bias_sets_every_gate_bias_and_keeps_the_drawn_weights():
    cfg = ModelConfig(emb_size=8, hidden_size=6, layers=2, dropout=0.0, softmax="full", lstm_bias=None)
    torch.manual_seed(0)
    drawn = RNNModel(50, cfg)  # torch's init
    torch.manual_seed(0)
    zero = RNNModel(50, cfg.model_copy(update={"lstm_bias": 0.0}))
    one = RNNModel(50, cfg.model_copy(update={"lstm_bias": 1.0}))
    biases = dict(zero.rnn.named_parameters())
    for name, p in drawn.rnn.named_parameters():
        if name.startswith("bias"):
            assert p.abs().min() > 0 and torch.equal(biases[name], torch.zeros(24))  # 4 gates x 6 units
        else:
            assert torch.equal(p, biases[name])  # the same draws: only the biases differ
    assert torch.equal(drawn.encoder.weight, zero.encoder.weight)
    for layer in range(2):
        total = getattr(one.rnn, f"bias_ih_l{layer}") + getattr(one.rnn, f"bias_hh_l{layer}")
        assert torch.equal(total, torch.ones(24))
