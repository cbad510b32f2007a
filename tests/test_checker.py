"""Agreement checker: the site finder on hand-written sentences, verdicts of hand-set LMs (known margins),
one batched forward, calibration, the explanation's ablation against `agreelens ablate`'s code and against
weight-zeroed copies, its known answers on a planted number unit, model loading with a fallback, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agreelens.ablation import ablate, verb_margins
from agreelens import checkbench
from agreelens.calibration import blimp_examples, blimp_figures
from agreelens.checker import (Checker, InputError, Lexicon, find_sites,
                               load_checker, morph_pairs, token_spans, validate_pairs, validate_text,
                               verb_evidence)
from agreelens.verdicts import NO_VERDICT, OperatingPoint, choose_operating_point, rates, threshold_for_budget
from agreelens.config import ModelConfig
from agreelens.model import RNNModel, save_model
from agreelens.scoring import pair_margins, score_pairs
from agreelens.stimuli import StimuliConfig
from agreelens.trace import trace, unit_to_layer_index
from agreelens.vocab import Vocab
from tests.conftest import run_cli
from tests.models import H, planted_model, random_lstm, stimuli_vocab, zero_outgoing
from tests.test_scoring import BigramLM

WORDS = """the a boy boys girl girls car cars dog dogs man men near who cats cat is are was were has have does
do doesn't don't isn't aren't like likes make makes walk walks want wants go goes to he she it they we i you
these this that those there where red here sense long . , ? school every day and think thinks carry carries
watch watches its his""".split()
VERBS = [("like", "likes"), ("make", "makes"), ("walk", "walks"), ("want", "wants"), ("go", "goes"),
         ("think", "thinks")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def vocab():
    return Vocab(["<eos>", "<unk>", *dict.fromkeys(WORDS)])


@pytest.fixture(scope="module")
def lexicon(vocab):
    return Lexicon.from_vocab(vocab, VERBS, source="test")


def sites_of(sentence, lexicon, vocab):
    return [(s.position, s.word, s.kind, s.number, s.alternate) for s in find_sites(sentence.split(), lexicon, vocab)]


# ---------------------------------------------------------------------------------------- sites


@pytest.mark.parametrize("sentence, expected", [
    ("the boys near the car likes the girl .", [(5, "likes", "verb", "singular", "like")]),
    ("the boy who like cats is here .", [(3, "like", "verb", "plural", "likes"), (5, "is", "aux", "singular", "are")]),
    ("where are the boys ?", []),  # inverted question: the subject comes after the auxiliary
    ("there is a dog .", [(1, "is", "there", "singular", "are")]),  # expletive: judged through the noun after it
    ("there is a red .", []),  # ... and no site without a noun within reach
    ("are the boys here ?", []),  # sentence-initial auxiliary
    ("he doesn't like cats .", [(1, "doesn't", "aux", "singular", "don't")]),  # like: after do-support
    ("i want to go .", [(1, "want", "verb", "plural", "wants")]),  # go: after to
    ("these car is red .", [(1, "car", "noun", "singular", "cars"), (2, "is", "aux", "singular", "are")]),
    ("that makes sense .", [(1, "makes", "verb", "singular", "make")]),
    ("the walks are long .", [(2, "are", "aux", "plural", "is")]),  # walks after "the": a noun
    ("he walk to school every day , and they goes .",
     [(1, "walk", "verb", "plural", "walks"), (9, "goes", "verb", "singular", "go")]),
    ("the boys carry cats .", []),  # carry/carries is no verb of this lexicon
    ("the dogs barks .", []),  # barks is not in the vocabulary
])
def test_site_finder_on_hand_written_sentences(sentence, expected, lexicon, vocab):
    assert sites_of(sentence, lexicon, vocab) == expected


def test_noun_site_names_its_determiner(lexicon, vocab):
    (site,) = [s for s in find_sites("i like those dog .".split(), lexicon, vocab) if s.kind == "noun"]
    assert (site.position, site.controller, site.alternate) == (3, 2, "dogs")


def test_morphology_and_corpus_evidence(vocab):
    pairs = morph_pairs(vocab)
    assert {("boy", "boys"), ("carry", "carries"), ("watch", "watches"), ("go", "goes"), ("man", "men")} <= set(pairs)
    assert not {p for p in pairs if p[0] in ("i", "it", "a", "hi")}  # i/is, it/its are never a pair
    lines = ["he likes cats .", "they like dogs .", "i like you .", "the boys like it .", "she watches it .",
             "we watch it .", "you watch us ."]
    verbs = verb_evidence(lines, pairs=pairs)
    assert ("like", "likes") in verbs and ("watch", "watches") in verbs
    assert ("boy", "boys") not in verbs and ("cat", "cats") not in verbs


def test_validate_text_statuses():
    assert validate_text("The boy runs. The girls run.") == ["The boy runs.", "The girls run."]
    cases = [(5, 400, "must be a string"), ("", 400, "empty"), (" \n\t ", 400, "empty"),
             ("bad \x07 bell", 400, r"U\+0007"), ("x" * 11, 413, "limit is 10"),
             ("A b. C d. E f.", 413, "3 sentences")]
    for text, status, msg in cases:
        with pytest.raises(InputError, match=msg) as err:
            validate_text(text, max_chars=10 if text == "x" * 11 else 100, max_sentences=2)
        assert err.value.status == status


def test_token_spans_point_into_the_sentence():
    s = "The boys' dogs don't bark."
    spans = token_spans(s)
    assert [s[a:b].lower() for a, b in spans] == ["the", "boys'", "dogs", "don't", "bark", "."]


# ---------------------------------------------------------------------------------------- verdicts


def agreement_bigram(vocab, gap=3.0):
    """After a singular noun 'likes'/'is' get +gap, after a plural noun 'like'/'are' (margins are exactly
    +-gap: the normalisers cancel); every other context is uniform."""
    logits = torch.zeros(len(vocab), len(vocab))
    for sg in ("boy", "girl", "dog", "car", "man"):
        logits[vocab.stoi[sg], [vocab.stoi["likes"], vocab.stoi["is"]]] = gap
    for pl in ("boys", "girls", "dogs", "cars", "men"):
        logits[vocab.stoi[pl], [vocab.stoi["like"], vocab.stoi["are"]]] = gap
    return BigramLM(logits)


def test_verdicts_of_a_hand_set_model(vocab, lexicon):
    model = agreement_bigram(vocab)
    checker = Checker(model, vocab, lexicon, threshold=0.0, scale=1.0, name="bigram", calibrated=True)
    r = checker.check("The boy likes the girl. The boys Likes the girl. The dogs like the car and the car are red.")
    assert model.forwards == 1  # one batched forward for every sentence
    s0, s1, s2 = r["sentences"]
    (a,) = s0["sites"]
    assert (a["word"], a["verdict"], a["suggestion"]) == ("likes", "ok", None)
    assert a["margin"] == pytest.approx(3.0, abs=1e-6)
    assert a["confidence"] == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-4)
    (b,) = s1["sites"]
    assert (b["word"], b["verdict"], b["suggestion"], b["alternate"]) == ("likes", "error", "Like", "like")
    assert b["margin"] == pytest.approx(-3.0, abs=1e-6) and b["site"] == 1
    assert s1["text"][b["span"][0]:b["span"][1]] == "Likes"
    assert [(x["word"], x["verdict"]) for x in s2["sites"]] == [("like", "ok"), ("are", "error")]
    assert r["n_sites"] == 4 and r["n_errors"] == 2 and r["notes"] == []
    # the threshold moves verdicts: at -4 nothing is an error, at +4 the correct sites are too
    assert Checker(model, vocab, lexicon, threshold=-4.0).check("The boys likes it.")["n_errors"] == 0
    assert Checker(model, vocab, lexicon, threshold=4.0).check("The boy likes it.")["n_errors"] == 1


def test_unknown_words_are_read_as_unk_and_reported(vocab, lexicon):
    checker = Checker(agreement_bigram(vocab), vocab, lexicon)
    r = checker.check("The zebra likes the girl.")
    (s,) = r["sentences"]
    assert s["unknown"] == [1] and r["unknown"] == ["zebra"]
    assert any("<unk>" in n and "zebra" in n for n in r["notes"])
    assert any("not calibrated" in n for n in r["notes"])
    (site,) = s["sites"]
    assert site["context_unknown"] == 1 and site["margin"] == pytest.approx(0.0, abs=1e-9)  # uniform after <unk>


def test_check_many_equals_check_and_margins_equal_the_scorer(vocab, lexicon):
    torch.manual_seed(0)
    model = RNNModel(len(vocab), ModelConfig(emb_size=8, hidden_size=8, dropout=0.0, softmax="adaptive",
                                             cutoffs=[20, 60], div_value=2.0)).eval()
    checker = Checker(model, vocab, lexicon, batch_size=2)
    texts = ["The boy likes the girl. These car is red.", "He walk to school every day, and they goes."]
    many = checker.check_many(texts)
    assert many == [checker.check(t) for t in texts]
    # each site's margin is the one-prefix scorer's on the same pair
    for sent in many[0]["sentences"] + many[1]["sentences"]:
        for s in sent["sites"]:
            pair = {"one_prefix_prefix": " ".join(sent["tokens"][:s["position"]]), "one_prefix_word_good": s["word"],
                    "one_prefix_word_bad": s["alternate"], "sentence_good": "x", "sentence_bad": "y",
                    "UID": "u", "pairID": "0"}
            m, _ = pair_margins(model, vocab, [pair])
            assert s["margin"] == pytest.approx(float(m[0]), abs=1e-4)


# ---------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("sentence, expected", [
    ("each of the boys like cats .", [(4, "like", "quantified", "plural", "singular")]),
    ("one of the girls that like cats walks .", [(5, "like", "verb", "plural", None),  # relative clause: skipped
                                                 (7, "walks", "quantified", "singular", "singular")]),
    ("every one of the cars is red .", [(5, "is", "quantified", "singular", "singular")]),
    ("the boy and the girl is here .", [(5, "is", "coordinated", "singular", "plural")]),
    ("the boy near the girl and the dog is here .", [(8, "is", "aux", "singular", None)]),  # "and" inside a PP
    ("the boy and i like it .", [(4, "like", "verb", "plural", None)]),  # after a pronoun: its own subject
    ("there are a car here .", [(1, "are", "there", "plural", None)]),
])
def test_quantified_coordinated_and_there_sites(sentence, expected, lexicon, vocab):
    got = [(s.position, s.word, s.kind, s.number, s.subject_number) for s in find_sites(sentence.split(), lexicon, vocab)]
    assert got == expected


def test_there_site_is_judged_through_the_noun_after_it(lexicon, vocab):
    (there,) = find_sites("there are a car here .".split(), lexicon, vocab)
    assert (there.span_end, there.controller) == (3, 3)


def test_subject_pattern_decides_and_says_so(vocab, lexicon):
    checker = Checker(agreement_bigram(vocab), vocab, lexicon, calibrated=True)
    r = checker.check("Each of the boys like cats. The boy and the girl are here.")
    a, b = (sent["sites"][0] for sent in r["sentences"])
    assert (a["word"], a["verdict"], a["suggestion"]) == ("like", "error", "likes")
    assert a["evidence"]["decided_by"] == "subject" and a["evidence"]["subject_number"] == "singular"
    assert (b["word"], b["kind"], b["verdict"]) == ("are", "coordinated", "ok")


def test_there_site_compares_both_sentences_through_the_noun(vocab, lexicon):
    # bigram: 'is'/'are' equally likely after 'there'; 'car' after 'a' as likely either way; the noun decides
    # through P(a | is) vs P(a | are): log 4 apart
    logits = torch.zeros(len(vocab), len(vocab))
    logits[vocab.stoi["is"], vocab.stoi["a"]] = math.log(4.0)
    checker = Checker(BigramLM(logits), vocab, lexicon, calibrated=True)
    (site,) = checker.check("There is a car.")["sentences"][0]["sites"]
    (bad,) = checker.check("There are a car.")["sentences"][0]["sites"]
    # log P(is a car) - log P(are a car): the normaliser after 'is' grows with exp(log 4) = 4 for one word
    n = len(vocab)
    expect = math.log(4.0) - math.log(n - 1 + 4.0) + math.log(n)
    assert site["margin"] == pytest.approx(expect, abs=1e-4) and bad["margin"] == pytest.approx(-expect, abs=1e-4)
    assert (site["kind"], site["verdict"], bad["verdict"]) == ("there", "ok", "error")
    assert site["evidence"]["decided_by"] == "there: verb to noun"


def test_sentence_without_a_site_is_reported(vocab, lexicon):
    r = Checker(agreement_bigram(vocab), vocab, lexicon, calibrated=True).check("The boy likes cats. Red cars.")
    assert [s["checkable"] for s in r["sentences"]] == [True, False]
    assert "no agreement site to check in sentence(s) 1" in r["notes"]


def test_threshold_for_budget_gives_the_stated_false_alarm_rate():
    # 10 correct sentences, their highest scores 9, 8, ..., 0 (sentence 0 has two sites)
    scores = torch.tensor([9.0, -5.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    sentence = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    for budget, flagged in ((0.0, 0), (10.0, 1), (25.0, 2), (30.0, 3), (100.0, 10)):
        t = threshold_for_budget(scores, sentence, 10, budget)
        assert rates(scores > t, sentence, 10) == pytest.approx(10.0 * flagged)


def test_operating_point_on_a_planted_dev_set():
    # correct sites at margins 1..20 (one per sentence), errors at -1..-20: any threshold between is perfect;
    # one correct sentence at margin -30 is the unavoidable false alarm of 1 in 21
    ok_m = torch.tensor([*range(1, 21), -30.0], dtype=torch.float64)
    err_m = -torch.arange(1, 21, dtype=torch.float64)
    ok = {"margin": ok_m, "readout": torch.zeros(21, dtype=torch.float64), "kind": ["aux"] * 21}
    err = {"margin": err_m, "readout": torch.zeros(20, dtype=torch.float64), "kind": ["aux"] * 20}
    op, table = choose_operating_point(ok, err, torch.arange(21), 21, 20, budget=5.0, unsure_budget=5.0,
                                       evidences=("margin",))
    s_ok, s_err = op.scores(ok_m, ok["readout"], ok["kind"]), op.scores(err_m, err["readout"], err["kind"])
    assert int((s_ok > op.error_at).sum()) == 1 and int((s_err > op.error_at).sum()) == 20
    assert table["margin"] == {"false_alarms_per_100": round(100 / 21, 2), "caught_per_100": 100.0,
                               "weights": op.to_dict()["weights"]}
    assert op.weights["*"][0] < 0 and op.unsure_at is None  # a larger margin is less of an error
    # a budget of 0 leaves even the planted sentence unflagged and still catches the errors below -30 only
    op0, _ = choose_operating_point(ok, err, torch.arange(21), 21, 20, 0.0, 0.0, ("margin",))
    assert int((op0.scores(err_m, err["readout"], err["kind"]) > op0.error_at).sum()) == 0


def test_unsure_is_shown_and_never_counted_as_an_error(vocab, lexicon):
    model = agreement_bigram(vocab)  # correct sites at margin +3, swapped at -3
    op = OperatingPoint("margin", {"*": [-1.0, 0.0, 0.0]}, error_at=4.0, unsure_at=2.0)
    r = Checker(model, vocab, lexicon, op=op, calibrated=True).check("The boys likes it. The boy likes it.")
    bad, good = (sent["sites"][0] for sent in r["sentences"])
    assert (bad["verdict"], bad["suggestion"], good["verdict"]) == ("unsure", "like", "ok")
    assert r["n_errors"] == 0 and r["n_unsure"] == 1
    assert bad["confidence"] == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-4)


def test_benchmark_figures_of_a_hand_set_model(vocab, lexicon):
    checker = Checker(agreement_bigram(vocab), vocab, lexicon, calibrated=True)
    records = [
        {"text": "The boy likes the girl.", "source": "s", "doc": "1",
         "errors": [{"position": 2, "word": "likes", "alternate": "like", "kind": "verb", "n_attractors": 0}]},
        {"text": "The boy near the cars likes it.", "source": "s", "doc": "2",  # the bigram reads 'cars'
         "errors": [{"position": 5, "word": "likes", "alternate": "like", "kind": "verb", "n_attractors": 1}]},
        {"text": "The dog runs.", "source": "t", "doc": "3",
         "errors": [{"position": 2, "word": "runs", "alternate": "run", "kind": "verb", "n_attractors": 0}]},
    ]
    ex = checkbench.examples(checker, records)
    f = checkbench.figures(checker.op, ex)
    assert f["all"] == {"sentences": 3, "false_alarms_per_100": round(100 / 3, 2), "unsure_per_100": 0.0,
                        "errors": 3, "caught_per_100": round(100 / 3, 2)}  # runs: no site, a miss
    assert f["by_attractors"]["1"] == {"sites": 1, "false_alarms_per_100": 100.0, "errors": 1, "caught_per_100": 0.0}
    assert f["by_attractors"]["0"]["caught_per_100"] == 50.0 and f["by_source"]["t"]["caught_per_100"] == 0.0
    assert f["sites_f1"] == {"precision": 0.5, "recall": round(1 / 3, 4), "f1": 0.4}


def test_blimp_pairs_at_the_operating_point(vocab, lexicon):
    checker = Checker(agreement_bigram(vocab, gap=2.0), vocab, lexicon, calibrated=True)
    blimp = [
        {"sentence_good": "The boy likes the girl.", "sentence_bad": "The boy like the girl.", "UID": "r1", "pairID": "0"},
        {"sentence_good": "The boys like the girl.", "sentence_bad": "The boy like the girl.", "UID": "r2", "pairID": "1"},
        {"sentence_good": "The boy is red.", "sentence_bad": "The boys is red.", "UID": "r2", "pairID": "2"},
        {"sentence_good": "The dog runs.", "sentence_bad": "The dogs runs.", "UID": "r2", "pairID": "3"},  # no site
    ]
    sents, sites, labels, covered = blimp_examples(lexicon, vocab, blimp)
    assert covered == 3 and labels == [0, 1, 0, 1, 0, 1] and [s.word for _, s in sites][:2] == ["likes", "like"]
    r = blimp_figures(checker, blimp)
    assert (r["covered"], r["f1"], r["pairs_both_right"]) == (3, 1.0, 1.0)


# ---------------------------------------------------------------------------------------- explain

@pytest.fixture(scope="module")
def na_vocab():
    cfg = StimuliConfig(n_per_condition=4)
    return stimuli_vocab(cfg, extra=("the", "and", ".")), cfg


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_explanation_ablation_equals_agreelens_ablate(na_vocab, softmax):
    vocab, cfg = na_vocab
    model = random_lstm(vocab, softmax)
    units = [2, 7, 9, 14]
    verbs = [(base, third) for third, base in cfg.verbs]  # the pools list [likes, like]
    checker = Checker(model, vocab, Lexicon.from_vocab(vocab, verbs), units=units, stimuli=cfg)
    text = "The boy near the cars likes the girl."
    e = checker.explain(text)
    s = e["site"]
    assert (s["word"], s["alternate"], s["position"]) == ("likes", "like", 5)
    # the full margin is the check's margin (nn.LSTM forward) and the scorer's
    assert e["margin"] == pytest.approx(s["margin"], abs=1e-4)
    # ablation: verb_margins (the code of `agreelens ablate`) on the pair written out independently
    pair = {"one_prefix_prefix": "the boy near the cars", "one_prefix_word_good": "likes",
            "one_prefix_word_bad": "like", "sentence_good": "the boy near the cars likes the girl",
            "sentence_bad": "the boy near the cars like the girl", "UID": "t", "pairID": "0"}
    from agreelens.trace import unit_mask

    masks = torch.stack([torch.ones(2 * H)] + [unit_mask([u], H, 2) for u in units] + [unit_mask(units, H, 2)])
    ref, _ = verb_margins(model, vocab, [pair], masks)
    ref = ref[:, 0]
    assert [a["units"] for a in e["ablations"]] == [[u] for u in units] + [units]
    for k, a in enumerate(e["ablations"]):
        assert a["margin"] == pytest.approx(float(ref[k + 1]), abs=1e-4)
        assert a["delta"] == pytest.approx(float(ref[k + 1] - ref[0]), abs=1e-4)
    # ... equal to zeroing each unit's outgoing weights and rescoring, and to ablate()'s verdicts
    for k, u in enumerate(units):
        m, _ = pair_margins(zero_outgoing(model, [u]), vocab, [pair])
        assert e["units"][k]["ablated_margin"] == pytest.approx(float(m[0]), abs=1e-4)
    res = ablate(model, vocab, [pair], units)
    for a in e["ablations"]:
        assert res["accuracy"]["+".join(map(str, a["units"]))] == float(a["margin"] > 0)
    # trajectories are the traced states, one value per step (<eos> + tokens)
    ids = torch.tensor([vocab.eos, *vocab.encode(e["sentence"]["tokens"])]).unsqueeze(1)
    tr = trace(model, ids)
    assert len(e["steps"]) == len(e["sentence"]["tokens"]) + 1 and e["predicting_step"] == 5
    for u in e["units"]:
        layer, j = unit_to_layer_index(u["unit"], H, 2)
        assert u["c"] == pytest.approx(tr.c[layer - 1, :, 0, j].tolist(), abs=1e-4)
        assert u["f"] == pytest.approx(tr.f[layer - 1, :, 0, j].tolist(), abs=1e-4)
    ro = e["readout"]
    assert ro["state"] == "L2.h" and len(ro["p_plural"]) == len(e["steps"])
    # P(plural) per step: the fitted logistic readout on the traced layer-2 h of that step (what the readout
    # learns: test_explain_on_a_planted_number_unit)
    fit = checker.readout()
    z = ((tr.h[1, :, 0] - fit.mean) / fit.std) @ fit.w + fit.b
    assert ro["p_plural"] == pytest.approx(torch.sigmoid(z).tolist(), abs=1e-4)


def test_explain_on_a_planted_number_unit(na_vocab):
    """Known answers of tests/models.py's planted model: unit 1 keeps the subject's number (cell +-1 from the
    subject on, h = tanh(1)), the layer-2 relays 9 and 10 copy it (h = tanh(tanh(5 tanh(1)))) and the
    decoder reads both, +-2 each on the singular and plural verb forms: margin 8 h."""
    vocab, cfg = na_vocab
    verbs = [(base, third) for third, base in cfg.verbs]
    checker = Checker(planted_model(vocab, cfg), vocab, Lexicon.from_vocab(vocab, verbs), units=[1, 9], stimuli=cfg)
    margin = 8 * math.tanh(math.tanh(5 * math.tanh(1.0)))  # 6.09; the decoder's noise adds < 0.05
    for text, word, plural in (("The boy near the cars likes the girl.", "likes", False),
                               ("The boys near the car like the girl.", "like", True)):
        e = checker.explain(text)
        assert (e["site"]["word"], e["site"]["verdict"]) == (word, "ok")
        assert e["margin"] == pytest.approx(margin, abs=0.05)
        one, nine, both = e["ablations"]
        assert (one["units"], nine["units"], both["units"]) == ([1], [9], [1, 9])
        assert abs(one["margin"]) < 0.05 and abs(both["margin"]) < 0.05  # without unit 1 no number reaches the verb
        assert nine["margin"] == pytest.approx(margin / 2, abs=0.05)  # one relay of two: half the margin
        # the readout knows the subject's number from the subject (step 2) to the attractor before the verb
        ro = e["readout"]
        assert ro["heldout_accuracy"] == 1.0
        assert all((p > 0.9) if plural else (p < 0.1) for p in ro["p_plural"][2:6]), ro["p_plural"]


def test_explain_rejects_bad_sites(vocab, lexicon):
    checker = Checker(random_lstm(vocab, "full"), vocab, lexicon)
    with pytest.raises(InputError, match="out of range") as err:
        checker.explain("The boy likes the girl.", site=3)
    assert err.value.status == 422
    with pytest.raises(InputError, match="no agreement site"):
        checker.explain("Hello there.")
    with pytest.raises(InputError, match="integer"):
        checker.explain("The boy likes the girl.", site="0")


def test_score_validates_pairs_and_equals_the_scorer(vocab, lexicon):
    model = agreement_bigram(vocab)
    checker = Checker(model, vocab, lexicon)
    pairs = [{"sentence_good": "the boy likes it .", "sentence_bad": "the boy like it .", "UID": "u", "pairID": "0"}]
    assert checker.score(pairs) == score_pairs(model, vocab, pairs, method="auto")
    for bad, msg in [("x", "list"), ([], "empty"), ([1], "object"), ([{"sentence_good": "a"}], "missing"),
                     ([{**pairs[0], "one_prefix_prefix": "the boy"}], "but not one_prefix_word_good")]:
        with pytest.raises(InputError, match=msg):
            validate_pairs(bad)
    with pytest.raises(InputError) as err:
        checker.score(pairs * 3, max_pairs=2)
    assert err.value.status == 413
    with pytest.raises(InputError, match="method"):
        checker.score(pairs, method="nope")


# ---------------------------------------------------------------------------------------- loading


def test_load_checker_falls_back_and_reads_the_calibration(tmp_path, vocab, monkeypatch, caplog):
    model = random_lstm(vocab, "full")
    save_model(model, vocab, tmp_path / "models" / "tiny", extra={"name": "tiny"})
    cal = {"threshold": -0.75, "scale": 2.0, "lexicon": {"source": "test", "verbs": [["like", "likes"]]}}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "calibration_tiny.json").write_text(json.dumps(cal))
    (tmp_path / "metrics" / "units_tiny.json").write_text(json.dumps({"number_units": [{"unit": 3}, {"unit": 12}]}))

    import agreelens.registry as registry

    def no_registry(uri, dst=None):
        raise RuntimeError("registry unreachable")

    monkeypatch.setattr(registry, "fetch", no_registry)
    with caplog.at_level("WARNING", logger="agreelens.checker"):
        c = load_checker("models:/agreelens-tiny@champion", root=tmp_path, fallback="tiny")
    assert "falling back to tiny" in caplog.text and "registry unreachable" in caplog.text
    assert c.name == "tiny" and c.threshold == -0.75 and c.scale == 2.0 and c.calibrated
    assert c.lexicon.verbs == [("like", "likes")] and c.units == [3, 12]
    assert c.notes and "unavailable" in c.notes[0]
    with pytest.raises(RuntimeError, match="unreachable"):
        load_checker("models:/agreelens-tiny@champion", root=tmp_path)
    # a calibration shipped in the model directory wins over metrics/
    (tmp_path / "models" / "tiny" / "calibration.json").write_text(json.dumps({**cal, "threshold": 1.5}))
    assert load_checker("tiny", root=tmp_path).threshold == 1.5
    # an operating point (and readout) shipped with the calibration decide the verdicts
    op = OperatingPoint("margin+readout", {"*": [-1.0, -0.5, 0.25]}, error_at=1.0, unsure_at=0.5,
                        expected={"false_alarms_per_100": 3.0})
    readout = {"state": "L2.h", "mean": [0.0] * H, "std": [1.0] * H, "w": [0.1] * H, "b": 0.0}
    (tmp_path / "models" / "tiny" / "calibration.json").write_text(json.dumps(
        {**cal, "threshold": None, "operating_point": op.to_dict(), "readout": readout}))
    c = load_checker("tiny", root=tmp_path)
    assert c.op == op and c.op.uses_readout and c.readout_for_verdicts().w.tolist() == pytest.approx([0.1] * H)
    assert c.check("The boys like it.")["operating_point"]["expected"] == {"false_alarms_per_100": 3.0}


@pytest.mark.slow
def test_calibrate_and_check_cli(project, vocab):
    root = project
    model = random_lstm(vocab, "adaptive")
    save_model(model, vocab, root / "models" / "tiny", extra={"name": "tiny"})
    (root / "prepared").mkdir()
    rec = lambda text, pos, word, alt: {"text": text, "source": "s", "doc": text, "errors": [  # noqa: E731
        {"position": pos, "word": word, "alternate": alt, "kind": "verb", "n_attractors": 0}]}
    for split in ("dev", "test"):
        (root / "checkbench").mkdir(exist_ok=True)
        (root / "checkbench" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            rec("The boy likes the girl.", 2, "likes", "like"), rec("The boys like it.", 2, "like", "likes"),
            rec("He walks to school.", 1, "walks", "walk")]))
    out = run_cli(["calibrate", "--model", "tiny", "--json"], cwd=root)
    r = json.loads(out.stdout)
    cal = json.loads((root / "metrics" / "calibration_tiny.json").read_text())
    assert cal["operating_point"] == r["operating_point"] and cal["lexicon"]["verbs"]
    assert r["test"]["all"]["sentences"] == 3 and r["test"]["all"]["errors"] == 3 and r["blimp"]["pairs"] == 6000
    assert r["operating_point"]["expected"]["caught_per_100"] == r["test"]["all"]["caught_per_100"]
    out = run_cli(["check", "The boys likes the girl.", "--model", "tiny", "--json"], cwd=root)
    c = json.loads(out.stdout)
    assert c["operating_point"]["error_at"] == cal["operating_point"]["error_at"]
    assert c["sentences"][0]["tokens"][:3] == ["the", "boys", "likes"]
    assert any(s["word"] == "likes" for s in c["sentences"][0]["sites"])
    bad = run_cli(["check", "   ", "--model", "tiny"], cwd=root, check=False)
    assert bad.returncode == 2 and "empty" in bad.stderr


# ---------------------------------------------------------------------------------------- parse rule


@pytest.fixture(scope="module")
def nlp():
    from agreelens.parserule import load

    parser = load()
    if parser is None:
        pytest.skip("spaCy's en_core_web_sm is not installed")
    return parser


def test_parse_rule_on_hand_written_sentences(nlp):
    from agreelens.parserule import rule_verdicts

    jobs = [("The boys near the car likes the girl .".split(), [(5, "verb")]),
            ("The boy near the cars likes the girl .".split(), [(5, "verb")]),
            ("There is many reasons to learn English .".split(), [(1, "there")]),
            ("I like these car .".split(), [(3, "noun")]),
            ("The dogs are red .".split(), [(2, "aux")])]
    assert [v[0] for v in rule_verdicts(nlp, jobs)] == [1, 0, 1, 1, 0]
    assert rule_verdicts(nlp, jobs, processes=2, chunk=2) == rule_verdicts(nlp, jobs)  # worker processes, same order


def test_hybrid_asks_the_parse_rule_only_above_ask_at(nlp, vocab, lexicon):
    model = agreement_bigram(vocab)  # reads the word before the verb: "car likes" looks right to it
    text = "The boys near the car likes the girl."
    never = OperatingPoint("margin+parser", {"*": [-1.0, 0.0, 0.0]}, error_at=10.0, ask_at=-10.0)
    (site,) = Checker(model, vocab, lexicon, op=never, parser=nlp).check(text)["sentences"][0]["sites"]
    assert (site["verdict"], site["confidence"], site["evidence"]["parse_rule"]) == ("error", None, "error")
    assert site["evidence"]["decided_by"] == "parse rule"
    # above ask_at only: the LM's margin (+3 for 'likes' after 'car') stays below it, so the LM decides
    above = OperatingPoint("margin+parser", {"*": [-1.0, 0.0, 0.0]}, error_at=10.0, ask_at=0.0)
    (site,) = Checker(model, vocab, lexicon, op=above, parser=nlp).check(text)["sentences"][0]["sites"]
    assert (site["verdict"], site["evidence"]["decided_by"]) == ("ok", "margin") and "parse_rule" not in site["evidence"]


def test_alone_at_leaves_the_lm_error_unsure_where_the_rule_has_no_verdict(nlp, vocab, lexicon, monkeypatch):
    import agreelens.parserule as parserule

    model = agreement_bigram(vocab)  # 'cars likes' reads as an error to it: margin -3, score +3
    text = "The boy near the cars likes the girl."
    monkeypatch.setattr(parserule, "verdicts_at", lambda parsed, at: [None] * len(at))  # the rule is silent

    def site(alone_at):
        op = OperatingPoint("margin+parser", {"*": [-1.0, 0.0, 0.0]}, error_at=0.0, ask_at=-10.0, alone_at=alone_at)
        (s,) = Checker(model, vocab, lexicon, op=op, parser=nlp).check(text)["sentences"][0]["sites"]
        return s["verdict"], s["evidence"]["decided_by"], s["evidence"]["parse_rule"]

    assert site(5.0) == ("unsure", "margin", "no verdict")  # score 3 is above error_at, not above alone_at
    assert site(2.0) == ("error", "margin", "no verdict")
    assert site(None) == ("error", "margin", "no verdict")


def test_verdict_codes_follow_the_rule_and_alone_at_on_hand_set_scores():
    from agreelens.sites import Site

    op = OperatingPoint("margin+parser", {"*": [-1.0, 0.0, 0.0]}, error_at=1.0, unsure_at=0.5, ask_at=-1.0, alone_at=3.0)
    margins = torch.tensor([-5.0, -2.0, -0.7, -5.0, 0.0, 2.0])  # scores 5, 2, 0.7, 5, 0, -2
    rules = [None, None, None, 0, 1, 1]  # no verdict x3, correct, error, error
    part = {"margin": margins, "readout": torch.zeros(6), "rule": rules,
            "meta": [{"site": Site(1, "likes", "like", "verb", "singular")} for _ in range(6)]}
    # above alone_at: error; between error_at and alone_at without a verdict: unsure; the unsure band as
    # before; the rule decides at 5 and 0 (asked); at -2 (not asked) its "error" is never read
    assert checkbench.verdict_codes(op, part).tolist() == [2, 1, 1, 0, 2, 0]
    assert op.verdict(2.0, NO_VERDICT)[0] == "unsure" and op.verdict(2.0)[0] == "error"
    assert op.verdict(4.0, NO_VERDICT)[0] == "error" and op.verdict(2.0, 0) == ("ok", None)
    assert OperatingPoint.from_dict(op.to_dict()) == op


def test_parse_ahead_gives_the_same_answers_from_the_parse_thread(nlp, vocab, lexicon, monkeypatch):
    """Requests of up to ``parse_ahead`` sentences are parsed before the LM has scored them, in the checker's one
    parse thread; the verdicts are those of parsing after the LM, and larger requests parse after it."""
    import threading

    import agreelens.parserule as parserule

    model = agreement_bigram(vocab)
    texts = ["The boys near the car likes the girl.", "The boy near the cars likes the girl. The dogs are red."]
    op = OperatingPoint("margin+parser", {"*": [-1.0, 0.0, 0.0]}, error_at=10.0, ask_at=-10.0)
    threads, parse = [], parserule.parse
    monkeypatch.setattr(parserule, "parse", lambda nlp_, s: threads.append(threading.current_thread().name) or parse(nlp_, s))
    after = Checker(model, vocab, lexicon, op=op, parser=nlp, parse_ahead=0).check_many(texts)
    ahead = Checker(model, vocab, lexicon, op=op, parser=nlp, parse_ahead=4).check_many(texts)
    assert ahead == after
    assert [s["verdict"] for r in ahead for sent in r["sentences"] for s in sent["sites"]] == ["error", "ok", "ok"]
    assert len(threads) == 2 and all(t.startswith("agreelens-parse") for t in threads)
    ck = Checker(model, vocab, lexicon, op=op, parser=nlp, parse_ahead=2)
    flat = [s for t in texts for s in ck.analyse(t)]
    keys = [(i, x) for i, sent in enumerate(flat) for x in sent["sites"]]
    assert ck._parse_ahead(flat, keys) is None  # 3 sentences with sites > 2: parsed after the LM, if asked


def test_load_checker_without_a_parser_uses_the_lm_operating_point(tmp_path, vocab, monkeypatch):
    import agreelens.parserule as parserule

    save_model(random_lstm(vocab, "full"), vocab, tmp_path / "models" / "tiny", extra={"name": "tiny"})
    hybrid = OperatingPoint("margin+parser", {"*": [-1.0, 0.0, 0.0]}, 1.0, None, {"caught_per_100": 90.0}, -2.0)
    lm = OperatingPoint("margin", {"*": [-0.5, 0.0, 0.0]}, 2.0, None, {"caught_per_100": 60.0})
    (tmp_path / "models" / "tiny" / "calibration.json").write_text(json.dumps(
        {"operating_point": hybrid.to_dict(), "operating_point_lm": lm.to_dict(),
         "lexicon": {"source": "test", "verbs": [["like", "likes"]]}}))
    monkeypatch.setattr(parserule, "load", lambda: None)
    c = load_checker("tiny", root=tmp_path)
    assert c.op == lm and c.parser is None and any("parse rule" in n for n in c.notes)
    monkeypatch.setattr(parserule, "load", lambda: "a parser")
    c = load_checker("tiny", root=tmp_path)
    assert c.op == hybrid and c.parser == "a parser"
