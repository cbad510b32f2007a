"""Tiny models and vocabularies shared by the tests: the NA stimuli's words as a vocabulary, a random
2x8 LSTM, the weight-zeroing reference of a unit ablation, a 2x8 LSTM with a planted number unit and
the hand-set project the service tests serve.

``zero_outgoing`` is the tests' own reference for ``agreelens.ablation`` (zeroed weights in a copy, not
the library's masks); keep it free of ``agreelens.ablation``/``agreelens.trace`` code paths."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch

from agreelens.config import ModelConfig
from agreelens.model import RNNModel, save_model
from agreelens.stimuli import StimuliConfig
from agreelens.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
H = 8  # hidden and embedding size of the models here; 2 layers, so units 1..16


def stimuli_vocab(cfg: StimuliConfig, extra=("the", "and"), shuffle: bool = False) -> Vocab:
    """``<eos>``, ``<unk>`` and every word of the stimuli pools plus ``extra``, sorted; ``shuffle``: in a
    fixed random order instead (verb forms land in the head and both tail clusters of an adaptive
    softmax with cutoffs [20, 60], mixed)."""
    words = set(extra)
    for pool in ("nouns", "verbs", "location_nouns"):
        for sg, pl in getattr(cfg, pool):
            words.update((sg, pl))
    for pool in ("adverbs", "manner_adverbs", "prepositions", "names"):
        words.update(getattr(cfg, pool))
    words = sorted(words)
    if shuffle:
        random.Random(0).shuffle(words)
    return Vocab(["<eos>", "<unk>", *words])


def random_lstm(vocab: Vocab, softmax: str = "adaptive", seed: int = 0) -> RNNModel:
    """A 2xH LSTM (cutoffs [20, 60] if adaptive) in eval mode with large uniform weights, so that
    ablating a unit changes margins visibly."""
    torch.manual_seed(seed)
    cfg = ModelConfig(emb_size=H, hidden_size=H, layers=2, dropout=0.0, softmax=softmax, cutoffs=[20, 60],
                      div_value=2.0)
    model = RNNModel(len(vocab), cfg).eval()
    with torch.no_grad():
        for p in model.rnn.parameters():
            p.uniform_(-0.8, 0.8)
        model.encoder.weight.uniform_(-1, 1)
    return model


def zero_outgoing(model: RNNModel, units) -> RNNModel:
    """A deep copy of a 2xH ``model`` with the outgoing weights of ``units`` (1-based, layer 1 first) set
    to 0: the unit's column in weight_hh of its layer, and in weight_ih of layer 2 (layer-1 units) or in
    the decoder's inputs (layer-2 units)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for unit in units:
            layer, j = divmod(unit - 1, H)
            getattr(m.rnn, f"weight_hh_l{layer}")[:, j] = 0
            if layer == 0:
                m.rnn.weight_ih_l1[:, j] = 0
            elif isinstance(m.decoder, torch.nn.Linear):
                m.decoder.weight[:, j] = 0
            else:
                m.decoder.head.weight[:, j] = 0
                for tail in m.decoder.tail:
                    tail[0].weight[:, j] = 0
    return m


def planted_model(vocab: Vocab, cfg: StimuliConfig, seed: int = 0) -> RNNModel:
    """A 2x8 LSTM in which unit 1 (layer 1, index 0) carries the subject's number to the verb.

    Embedding dim 0 is +1 for singular subject nouns and -1 for plural ones, dim 1 is 1 for any subject
    noun; other words and dims are random. Unit 1 opens its input gate on a subject noun, writes its
    number into its cell and keeps it (forget gate 1). Layer-2 units 0 and 1 both relay it (either
    alone is enough), and the decoder reads them: +2 for singular verbs, -2 for plural ones. Every
    other weight is random noise that does not read number features, the decoder's small (0.01).
    """
    g = torch.Generator().manual_seed(seed)
    model = RNNModel(len(vocab), ModelConfig(emb_size=H, hidden_size=H, layers=2, dropout=0.0, softmax="full"))
    rnn = model.rnn
    with torch.no_grad():
        for p in [*rnn.parameters(), model.encoder.weight]:
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
        model.decoder.weight.copy_((torch.rand(model.decoder.weight.shape, generator=g) - 0.5) * 0.02)
        model.decoder.bias.zero_()
        emb = model.encoder.weight
        emb[:, :2] = 0
        for sg, pl in cfg.nouns:
            emb[vocab.stoi[sg], :2] = torch.tensor([1.0, 1.0])
            emb[vocab.stoi[pl], :2] = torch.tensor([-1.0, 1.0])
        rows = lambda j: [j, H + j, 2 * H + j, 3 * H + j]  # noqa: E731  gates i, f, g, o of unit j
        rnn.weight_ih_l0[:, :2] = 0  # noise units do not read the number features
        for w in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0):
            w[rows(0)] = 0
        rnn.weight_ih_l0[0, 1] = 20.0  # input gate: open on subject nouns
        rnn.bias_ih_l0[0] = -10.0
        rnn.bias_ih_l0[H] = 10.0  # forget gate: keep
        rnn.weight_ih_l0[2 * H, 0] = 5.0  # candidate: the number
        rnn.bias_ih_l0[3 * H] = 10.0  # output gate: open
        for j in (0, 1):  # layer-2 relays
            for w in (rnn.weight_ih_l1, rnn.weight_hh_l1, rnn.bias_ih_l1, rnn.bias_hh_l1):
                w[rows(j)] = 0
            rnn.bias_ih_l1[j] = 10.0
            rnn.bias_ih_l1[H + j] = -10.0
            rnn.weight_ih_l1[2 * H + j, 0] = 5.0
            rnn.bias_ih_l1[3 * H + j] = 10.0
        rnn.weight_ih_l1[:, 0][[k for k in range(4 * H) if k % H > 1]] = 0  # noise: no number input
        for sg, pl in cfg.verbs:
            model.decoder.weight[vocab.stoi[sg], :2] = 2.0
            model.decoder.weight[vocab.stoi[pl], :2] = -2.0
    return model.eval()


def tiny_service_project(root: Path) -> None:
    """A project folder for the service: params.yaml (service.fallback: tiny), models/tiny (hand-set:
    'like' beats 'likes' by 4 nats after any prefix), its calibration (threshold 0, scale 1, lexicon of
    the NA verbs) and number units 1 and 9."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.setdefault("service", {})["fallback"] = "tiny"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = StimuliConfig()
    vocab = stimuli_vocab(cfg, extra=("the", "and", ".", "is", "are", "hello", "there"))
    torch.manual_seed(0)
    model = RNNModel(len(vocab), ModelConfig(emb_size=H, hidden_size=H, layers=2, dropout=0.0, softmax="full"))
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
        model.decoder.bias[vocab.stoi["like"]] = 4.0
    save_model(model, vocab, root / "models" / "tiny", extra={"name": "tiny"})
    cal = {"threshold": 0.0, "scale": 1.0,
           "lexicon": {"source": "test", "verbs": [[base, third] for third, base in cfg.verbs]}}
    (root / "models" / "tiny" / "calibration.json").write_text(json.dumps(cal))
    (root / "metrics").mkdir()
    (root / "metrics" / "units_tiny.json").write_text(json.dumps({"number_units": [{"unit": 1}, {"unit": 9}]}))
