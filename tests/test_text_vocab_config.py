from collections import Counter

import pytest

from agreelens.config import ParamsError, load_params, resolve
from agreelens.text import split_sentences, tokenize
from agreelens.vocab import EOS, UNK, Vocab


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("The boy\u2019s dogs don't bark, do they?") == [
        "the", "boy's", "dogs", "don't", "bark", ",", "do", "they", "?"]
    assert tokenize("A well-known 3.5-hour trip \u2014 \u201cwow\u201d!") == [
        "a", "well-known", "3.5-hour", "trip", "-", '"', "wow", '"', "!"]
    assert tokenize("   ") == []


def test_split_sentences_keeps_abbreviations_together():
    text = 'Mr. Smith went to Washington. He said "Hi!" Then 3 dogs came.'
    assert split_sentences(text) == ["Mr. Smith went to Washington.", 'He said "Hi!"', "Then 3 dogs came."]
    assert split_sentences("no capital after. so one sentence") == ["no capital after. so one sentence"]


def test_vocab_is_frequency_ordered_with_specials():
    counts = Counter({"the": 10, "boy": 5, "boys": 5, "rare": 1})
    v = Vocab.build(counts, min_count=2, max_size=10)
    assert v.itos[:2] == [EOS, UNK]
    assert v.itos[2:] == ["the", "boy", "boys"]  # ties broken alphabetically
    assert v.encode(["the", "rare"]) == [v.index("the"), v.unk]
    ids = v.encode_lines(["the boy", "boys"])
    assert ids.tolist() == [2, 3, v.eos, 4, v.eos]
    assert len(Vocab.build(counts, 1, 4)) == 4


def test_vocab_roundtrip(tmp_path):
    v = Vocab.build(Counter("a b b c c c".split()), 1, 100)
    v.save(tmp_path / "vocab.txt")
    assert Vocab.load(tmp_path / "vocab.txt").itos == v.itos


def test_profiles_override_and_validate(tmp_path):
    base = {"model": {"hidden_size": 100}, "profiles": {"big": {"model": {"hidden_size": 900}}}}
    assert resolve(base).model.hidden_size == 100
    big = resolve(base, "big")
    assert big.model.hidden_size == 900 and big.profile == "big"
    with pytest.raises(ParamsError, match="profile 'nope' is not defined"):
        resolve(base, "nope")
    with pytest.raises(ParamsError, match="model.hidden_size"):
        resolve({"model": {"hidden_size": -1}})
    with pytest.raises(ParamsError, match="train.typo_field"):
        resolve({"train": {"typo_field": 1}})
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_repository_params_load_every_profile():
    from tests.conftest import ROOT

    for profile in ("default", "paper", "long", "learner", "tiny"):
        p = load_params(ROOT / "params.yaml", profile)
        assert set(p.prepare.sizes) == {"small", "large"}
    paper = load_params(ROOT / "params.yaml", "paper")
    assert (paper.model.emb_size, paper.model.hidden_size, paper.model.layers) == (650, 650, 2)
    assert (paper.train.batch_size, paper.train.bptt, paper.model.dropout) == (128, 35, 0.2)
    learner_text = ["tatoeba", "onestopenglish"]
    default, long, learner = (load_params(ROOT / "params.yaml", p) for p in ("default", "long", "learner"))
    assert default.data.corpora == [*learner_text, "wikitext2"] and default.train.epochs == 1
    assert default.train.attractor_weight == 4.0
    assert long.data.corpora == default.data.corpora and long.train.epochs == 2  # only training and stacking differ
    assert long.train.attractor_weight == 1.0 and (long.syntax.stack, default.syntax.stack) == (0.0, 0.5)
    assert (long.model.lstm_bias, default.model.lstm_bias) == (None, 0.0)  # torch's init, as measured
    assert long.model_copy(update={"train": default.train, "syntax": default.syntax, "model": default.model,
                                   "profile": "default"}) == default
    assert (learner.data.corpora, learner.prepare.max_vocab, learner.train.epochs) == (learner_text, 16000, 4)
    assert learner.train.attractor_weight == 1.0
    assert paper.data.corpora == learner_text
    assert load_params(ROOT / "params.yaml", "tiny").data.corpora == learner_text


def test_typed_defaults_are_the_default_profile():
    """A config built in code (``Params()``, ``TrainConfig()``, ...) is the one `dvc repro` runs, not another."""
    from agreelens.config import Params
    from tests.conftest import ROOT

    assert Params().model_dump() == load_params(ROOT / "params.yaml", "default", env=False).model_dump()
    paper = load_params(ROOT / "params.yaml", "paper", env=False)
    assert (paper.model.softmax, paper.train.optimizer, paper.train.epochs, paper.train.agreement_loss) == \
        ("full", "sgd", 40, 0.0)
