"""Minimal-pair scorer: known answers from hand-set LMs, OOV handling, batching, agreement with a naive
unbatched computation on real (random) RNN models, pair-file reading."""

from __future__ import annotations

import json
import re
import math

import pytest
import torch
from torch import nn

from agreelens.config import ModelConfig
from agreelens.model import RNNModel
from agreelens.scoring import pair_margins, prefix_trie, read_pairs, score_pairs
from agreelens.stimuli import StimuliConfig, generate, write
from agreelens.text import tokenize
from agreelens.vocab import Vocab

N = 10  # pairs per condition


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


class BigramLM(nn.Module):
    """Next-word log-probabilities set by hand in a (V, V) table indexed by the previous word, behind
    the RNNModel interface: the 'features' of a position are its next-word log-distribution."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("table", torch.log_softmax(logits.double(), dim=-1))
        self.forwards = 0
        self.tokens = 0

    def init_hidden(self, batch_size: int):
        return None

    def forward(self, input, hidden=None):
        self.forwards += 1
        self.tokens += input.numel()
        return self.table[input], hidden

    def target_log_probs(self, features, targets):
        return features.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def log_probs(self, features):
        return features


@pytest.fixture(scope="module")
def stim_cfg():
    return StimuliConfig(n_per_condition=N)


@pytest.fixture(scope="module")
def stimuli(stim_cfg):
    return generate(stim_cfg)[0]


@pytest.fixture(scope="module")
def vocab(stim_cfg):
    words = {"the", "and", "big"}
    for pool in ("nouns", "verbs", "location_nouns"):
        for sg, pl in getattr(stim_cfg, pool):
            words.update((sg, pl))
    for pool in ("adverbs", "manner_adverbs", "prepositions", "names"):
        words.update(getattr(stim_cfg, pool))
    return Vocab(["<eos>", "<unk>", *sorted(words)])


def ids(vocab, words):
    return torch.tensor([vocab.stoi[w] for w in words], dtype=torch.long)


def plural_preferring(vocab, cfg, boost=1.0):
    """Every context: plural verb forms get logit +boost, everything else 0 (a unigram model)."""
    logits = torch.zeros(len(vocab), len(vocab))
    logits[:, ids(vocab, [pl for _, pl in cfg.verbs])] = boost
    return BigramLM(logits)


def local_agreement(vocab, cfg):
    """The verb agrees with the word right before it: after a singular noun or a name the singular
    forms get +2, after a plural noun the plural forms; every other context is uniform."""
    logits = torch.zeros(len(vocab), len(vocab))
    sg_verbs = ids(vocab, [sg for sg, _ in cfg.verbs])
    pl_verbs = ids(vocab, [pl for _, pl in cfg.verbs])
    nouns = cfg.nouns + cfg.location_nouns
    for w in ids(vocab, [sg for sg, _ in nouns] + cfg.names):
        logits[w, sg_verbs] = 2.0
    for w in ids(vocab, [pl for _, pl in nouns]):
        logits[w, pl_verbs] = 2.0
    return BigramLM(logits)


def test_prefix_trie_known_answer():
    seqs = [[0, 5, 6], [0, 5, 7], [0, 5], [0, 8, 6], [1], [0, 5, 6]]
    tokens, parents, leaves = prefix_trie(seqs)
    assert tokens == [[0, 1], [5, 8], [6, 7, 6]]
    assert parents == [[-1, -1], [0, 0], [0, 0, 1]]  # the second 6 continues 0 8, not 0 5
    assert leaves == [0, 1, 0, 2, 1, 0]
    for seq, leaf in zip(seqs, leaves):  # walking up from each leaf spells its sequence
        node, spelled = leaf, []
        for d in range(len(seq) - 1, -1, -1):
            spelled.insert(0, tokens[d][node])
            node = parents[d][node]
        assert spelled == seq and node == -1
    assert prefix_trie([]) == ([], [], [])


@pytest.mark.parametrize("method", ["prefix", "sentence", "auto"])
def test_plural_preferring_model_known_accuracy(stimuli, vocab, stim_cfg, method):
    model = plural_preferring(vocab, stim_cfg)
    res = score_pairs(model, vocab, stimuli, batch_size=32, method=method)
    assert res["n"] == len(stimuli) == 18 * N and res["oov"] == 0
    assert res["accuracy"] == pytest.approx(0.5, abs=1e-12)  # half the subjects are plural
    expected = {
        **{f"{c}/{cond}": float(cond[0] == "P") for c in ("simple", "adv", "adv_adv", "adv_conjunction", "namepp")
           for cond in ("S", "P")},
        **{f"{c}/{cond}": float(cond[0] == "P") for c in ("nounpp", "nounpp_adv")
           for cond in ("SS", "SP", "PS", "PP")},
    }
    assert {k: g["accuracy"] for k, g in res["groups"].items()} == expected
    assert all(g["n"] == N for g in res["groups"].values())
    # a unigram model: the margin is exactly the logit gap, +1 for plural subjects, -1 for singular
    margins, scored = pair_margins(model, vocab, stimuli, method=method)
    want = torch.tensor([1.0 if p["condition"][0] == "P" else -1.0 for p in stimuli], dtype=torch.float64)
    assert scored.all()
    assert torch.allclose(margins, want, atol=1e-9)


@pytest.mark.parametrize("method", ["prefix", "sentence"])
def test_local_agreement_model_is_fooled_by_attractors(stimuli, vocab, stim_cfg, method):
    model = local_agreement(vocab, stim_cfg)
    res = score_pairs(model, vocab, stimuli, method=method)
    acc = {k: g["accuracy"] for k, g in res["groups"].items()}
    # subject right before the verb: always right
    assert acc["simple/S"] == acc["simple/P"] == 1.0
    # a noun attractor right before the verb decides: right when it matches the subject
    assert (acc["nounpp/SS"], acc["nounpp/SP"], acc["nounpp/PS"], acc["nounpp/PP"]) == (1.0, 0.0, 0.0, 1.0)
    # a (singular) name before the verb: right for singular subjects only
    assert (acc["namepp/S"], acc["namepp/P"]) == (1.0, 0.0)
    # an adverb before the verb carries no number: uniform, every pair a tie, ties are wrong
    for c in ("adv", "adv_adv", "adv_conjunction", "nounpp_adv"):
        assert all(acc[k] == 0.0 for k in acc if k.startswith(c + "/"))
    right = 2 * N + 2 * N + N  # simple S+P, nounpp SS+PP, namepp S
    assert res["accuracy"] == pytest.approx(right / (18 * N), abs=1e-12)
    margins, _ = pair_margins(model, vocab, stimuli, method=method)
    adv = torch.tensor([p["construction"] in ("adv", "adv_adv", "adv_conjunction", "nounpp_adv") for p in stimuli])
    assert torch.all(margins[adv] == 0)


def test_result_is_json_with_group_keys(vocab, stim_cfg, stimuli):
    model = plural_preferring(vocab, stim_cfg)
    blimp = [
        {"sentence_good": "the boys like the girl .", "sentence_bad": "the boys likes the girl .",
         "UID": "regular_plural_subject_verb_agreement_1", "pairID": "0"},
        {"sentence_good": "the boy likes the girl .", "sentence_bad": "the boy like the girl .",
         "UID": "regular_plural_subject_verb_agreement_1", "pairID": "1"},
    ]
    res = score_pairs(model, vocab, stimuli[:3] + blimp)
    res = json.loads(json.dumps(res))
    assert set(res) >= {"accuracy", "n", "oov", "groups"}
    assert isinstance(res["accuracy"], float) and isinstance(res["n"], int) and isinstance(res["oov"], int)
    assert set(res["groups"]) == {"simple/S", "regular_plural_subject_verb_agreement_1"}
    assert res["groups"]["regular_plural_subject_verb_agreement_1"] == {"accuracy": 0.5, "n": 2, "oov": 0}
    for g in res["groups"].values():
        assert isinstance(g["accuracy"], float) and isinstance(g["n"], int)


def test_oov_pairs_counted_not_scored(vocab, stim_cfg):
    model = plural_preferring(vocab, stim_cfg)
    pairs = [
        # prefix method, target word unknown: not scored
        {"one_prefix_prefix": "the boys", "one_prefix_word_good": "zorp", "one_prefix_word_bad": "likes",
         "sentence_good": "the boys zorp", "sentence_bad": "the boys likes", "UID": "u", "pairID": "0"},
        # prefix method, unknown word only in the shared prefix: scored (it is <unk>, as in training)
        {"one_prefix_prefix": "the qwerty boys", "one_prefix_word_good": "like", "one_prefix_word_bad": "likes",
         "sentence_good": "x", "sentence_bad": "y", "UID": "u", "pairID": "1"},
        # sentence method, the differing word unknown: not scored
        {"sentence_good": "the boys blorf the girl", "sentence_bad": "the boys likes the girl",
         "UID": "v", "pairID": "2"},
        # sentence method, unknown shared word: scored
        {"sentence_good": "the qwerty boys like the girl", "sentence_bad": "the qwerty boys likes the girl",
         "UID": "v", "pairID": "3"},
    ]
    margins, scored = pair_margins(model, vocab, pairs)
    assert scored.tolist() == [False, True, False, True]
    assert math.isnan(margins[0]) and math.isnan(margins[2])
    assert margins[1].item() == pytest.approx(1.0) and margins[3].item() == pytest.approx(1.0)
    res = score_pairs(model, vocab, pairs)
    assert (res["n"], res["oov"], res["accuracy"]) == (2, 2, 1.0)
    assert res["groups"] == {"u": {"accuracy": 1.0, "n": 1, "oov": 1}, "v": {"accuracy": 1.0, "n": 1, "oov": 1}}
    with pytest.raises(ValueError, match="one-prefix"):
        pair_margins(model, vocab, pairs, method="prefix")
    with pytest.raises(ValueError, match="method"):
        pair_margins(model, vocab, pairs, method="two_prefix")


def test_batching_invariance_and_one_forward_per_batch(vocab, stim_cfg, stimuli):
    model = local_agreement(vocab, stim_cfg)
    for method in ("prefix", "sentence"):
        one, s1 = pair_margins(model, vocab, stimuli, batch_size=1, method=method)
        many, s64 = pair_margins(model, vocab, stimuli, batch_size=64, method=method)
        assert torch.equal(one, many) and torch.equal(s1, s64)
    model.forwards = model.tokens = 0
    pair_margins(model, vocab, stimuli, batch_size=64, method="prefix")
    # the prefix trie: each distinct prefix (of a prefix) is stepped once, a depth at a time
    prefixes = [("<eos>", *tokenize(p["one_prefix_prefix"])) for p in stimuli]
    nodes = {pre[:d] for pre in prefixes for d in range(1, len(pre) + 1)}
    depth = [sum(1 for v in nodes if len(v) == d) for d in range(1, max(map(len, prefixes)) + 1)]
    assert model.tokens == len(nodes) < sum(map(len, prefixes))
    assert model.forwards == sum(math.ceil(k / 64) for k in depth)
    model.forwards = 0
    pair_margins(model, vocab, stimuli, batch_size=64, method="sentence")
    assert model.forwards == math.ceil(2 * len(stimuli) / 64)  # good and bad sentence each


def naive_logp(model, vocab, context, words):
    """log P(words | <eos> context) one sequence at a time, from the full distribution."""
    seq = [vocab.eos, *vocab.encode(context), *vocab.encode(words)]
    with torch.no_grad():
        feats, _ = model(torch.tensor(seq).unsqueeze(1))
        lp = model.log_probs(feats)[:, 0]  # (T, V)
    start = 1 + len(context)
    return sum(lp[t - 1, seq[t]].item() for t in range(start, len(seq)))


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_random_rnn_matches_naive_computation(vocab, stimuli, softmax):
    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=24, hidden_size=32, layers=2, dropout=0.3, softmax=softmax, cutoffs=[20, 60])
    model = RNNModel(len(vocab), cfg)
    model.train()  # the scorer must switch dropout off, and restore the mode afterwards
    pairs = stimuli[::3]
    multi = [
        {"one_prefix_prefix": "the boys near the", "one_prefix_word_good": "big cars",
         "one_prefix_word_bad": "big car", "sentence_good": "-", "sentence_bad": "-", "UID": "m", "pairID": "0"},
    ]
    margins, scored = pair_margins(model, vocab, pairs + multi, batch_size=16, method="prefix")
    assert model.training
    model.eval()
    want = []
    for p in pairs + multi:
        ctx = tokenize(p["one_prefix_prefix"])
        want.append(
            naive_logp(model, vocab, ctx, tokenize(p["one_prefix_word_good"]))
            - naive_logp(model, vocab, ctx, tokenize(p["one_prefix_word_bad"]))
        )
    assert scored.all()
    assert torch.allclose(margins, torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)
    assert margins.abs().max() > 1e-3  # a real comparison, not all zeros

    sent, _ = pair_margins(model, vocab, pairs, batch_size=16, method="sentence")
    want_sent = [
        naive_logp(model, vocab, [], tokenize(p["sentence_good"]) + ["<eos>"])
        - naive_logp(model, vocab, [], tokenize(p["sentence_bad"]) + ["<eos>"])
        for p in pairs
    ]
    assert torch.allclose(sent, torch.tensor(want_sent, dtype=torch.float64), atol=1e-5, rtol=0)

    # batch size changes only float rounding (BLAS kernels), never which answer is right
    one, _ = pair_margins(model, vocab, pairs, batch_size=1, method="prefix")
    many, _ = pair_margins(model, vocab, pairs, batch_size=64, method="prefix")
    assert torch.allclose(one, many, atol=1e-5, rtol=0)
    clear = (one.abs() > 1e-4)
    assert torch.equal((one > 0)[clear], (many > 0)[clear])


def test_read_pairs_and_score_written_stimuli(tmp_path, stimuli, vocab, stim_cfg):
    paths = write(stimuli, tmp_path / "na")
    jsonl = sorted(p for p in paths if p.suffix == ".jsonl")
    pairs = read_pairs(jsonl)
    assert len(pairs) == len(stimuli)
    res = score_pairs(plural_preferring(vocab, stim_cfg), vocab, pairs)
    assert res["accuracy"] == pytest.approx(0.5) and len(res["groups"]) == 18


def test_read_pairs_errors_name_file_and_line(tmp_path):
    good = {"sentence_good": "a b", "sentence_bad": "a c", "UID": "u", "pairID": "0"}
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        read_pairs(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps({"sentence_good": "a", "UID": "u", "pairID": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field\(s\) sentence_bad"):
        read_pairs(f)
    f.write_text(json.dumps({**good, "one_prefix_prefix": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*one_prefix_word_good"):
        read_pairs(f)
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "nope.jsonl")
    f.write_text(json.dumps(good) + "\n")
    assert read_pairs(str(f)) == [good]


def test_one_pair_model_for_files_and_requests(tmp_path):
    """Pair files and in-memory pairs (the service's /score) are checked by the same model, same message."""
    from agreelens.checker import InputError, validate_pairs
    from agreelens.scoring import Pair, pair_problem

    good = {"sentence_good": "a b", "sentence_bad": "a c", "UID": "u", "pairID": 3, "extra": "kept"}
    assert pair_problem(good) is None and Pair.model_validate(good).model_extra == {"extra": "kept"}
    assert Pair.model_json_schema()["required"] == ["sentence_good", "sentence_bad", "UID", "pairID"]
    for bad, msg in [({**good, "sentence_bad": None}, "missing field(s) sentence_bad"),
                     ({**good, "sentence_good": 5}, "sentence_good must be a string, got 5"),
                     ({**good, "pairID": 1.5}, "pairID must be a string or an integer, got 1.5"),
                     ({**good, "one_prefix_word_bad": "c"},
                      "has one_prefix_word_bad but not one_prefix_prefix, one_prefix_word_good")]:
        assert pair_problem(bad) == msg
        f = tmp_path / "p.jsonl"
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"p.jsonl:1: {msg}")):
            read_pairs(f)
        with pytest.raises(InputError, match=re.escape(f"pairs[0]: {msg}")):
            validate_pairs([bad])
