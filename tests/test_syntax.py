"""Syntax-aware augmentation: sites and modifiers from hand-parsed sentences, the insertion keeps the verb's
form and puts a noun of the other number between subject and verb, and the gate's insertion check."""

import pytest

from agreelens.quality import inserted_length
from agreelens.syntax import SyntaxConfig, sentence_structure, synthesize
from tests.test_natural import parsed

pytest.importorskip("spacy")


def test_sites_and_modifiers_of_a_parsed_sentence():
    # the keys to the cabinet are on the table .   (a modifier; the subject already has one: no site)
    doc = parsed(["The", "keys", "to", "the", "cabinet", "are", "on", "the", "table", "."],
                 ["DT", "NNS", "IN", "DT", "NN", "VBP", "IN", "DT", "NN", "."],
                 [1, 5, 1, 4, 2, 5, 5, 8, 6, 5],
                 ["det", "nsubj", "prep", "det", "pobj", "ROOT", "prep", "det", "pobj", "punct"])
    st = sentence_structure(doc)
    assert st["sites"] == []
    assert st["mods"] == [[2, 5, "S", "P", "prep"]]  # "to the cabinet": singular noun, after a plural head
    # the boy likes the girls .   (a site: bare subject, agreeing verb)
    doc = parsed(["The", "boy", "likes", "the", "girls", "."], ["DT", "NN", "VBZ", "DT", "NNS", "."],
                 [1, 2, 2, 4, 2, 2], ["det", "nsubj", "ROOT", "det", "dobj", "punct"])
    assert sentence_structure(doc) == {"sites": [[1, 2, "S"]], "mods": []}
    # someone likes it . : an indefinite pronoun tagged as a noun is no site
    doc = parsed(["Someone", "likes", "it", "."], ["NN", "VBZ", "PRP", "."], [1, 1, 1, 1],
                 ["nsubj", "ROOT", "dobj", "punct"])
    assert sentence_structure(doc)["sites"] == []


def test_insertion_puts_an_attractor_between_subject_and_verb_and_keeps_the_verb():
    lines = ["the boy likes the girl .", "the dogs near the house bark .", "the keys to the cabinets are here .",
             "the men who watch the games are loud ."]
    parsed_recs = [
        {"k": 0, "sites": [[1, 2, "S"]], "mods": []},
        {"k": 1, "sites": [], "mods": [[2, 5, "S", "P", "prep"]]},     # near the house (singular)
        {"k": 2, "sites": [], "mods": [[2, 5, "P", "P", "prep"]]},     # to the cabinets (plural)
        {"k": 3, "sites": [], "mods": [[2, 6, "P", "P", "relcl"]]},    # who watch the games: only after a plural subject
    ]
    out, stats = synthesize(lines, parsed_recs, SyntaxConfig(other_number=1.0, stack=0.0))
    assert out == [(0, "the boy to the cabinets likes the girl .")]
    assert stats["synthetic"] == 1 and stats["subject_modifier_numbers"] == {"SP": 1}
    assert stats["modifiers"] == {"P/*": 1, "P/P": 1, "S/*": 1}
    same, _ = synthesize(lines, parsed_recs, SyntaxConfig(other_number=0.0, stack=0.0))
    assert same == [(0, "the boy near the house likes the girl .")]  # same-number noun when asked
    # a plural subject may take the relative clause whose verb agrees with a plural head
    recs = [{"k": 0, "sites": [[1, 2, "P"]], "mods": []}, parsed_recs[3]]
    out, _ = synthesize(["the cats sleep .", *lines[1:]], recs, SyntaxConfig(other_number=0.0, stack=0.0))
    assert out == [(0, "the cats who watch the games sleep .")]
    out, _ = synthesize(["the cat sleeps .", *lines[1:]], [{"k": 0, "sites": [[1, 2, "S"]], "mods": []}, parsed_recs[3]],
                        SyntaxConfig(other_number=1.0, stack=0.0))
    assert out == []  # "the cat who watch the games": never made


def test_stacked_insertion_puts_two_phrases_of_the_other_number_between_subject_and_verb():
    lines = ["the boy likes the girl .", "the keys to the cabinets are here .", "the dogs near the houses bark .",
             "the men who watch the games are loud ."]
    recs = [{"k": 0, "sites": [[1, 2, "S"]], "mods": []},
            {"k": 1, "sites": [], "mods": [[2, 5, "P", "P", "prep"]]},    # to the cabinets
            {"k": 2, "sites": [], "mods": [[2, 5, "P", "P", "prep"]]},    # near the houses
            {"k": 3, "sites": [], "mods": [[2, 6, "P", "P", "relcl"]]}]   # a clause is never stacked
    out, stats = synthesize(lines, recs, SyntaxConfig(other_number=1.0, stack=1.0))
    assert len(out) == 1 and stats["stacked"] == 1
    k, text = out[0]
    assert k == 0 and text in ("the boy to the cabinets near the houses likes the girl .",
                               "the boy near the houses to the cabinets likes the girl .")
    assert inserted_length(lines[0].split(), text.split()) == 6  # both phrases, the verb kept
    # one prepositional phrase of the other number: nothing to stack, no sentence
    out, stats = synthesize(lines[:2] + lines[3:], [recs[0], recs[1], {**recs[3], "k": 2}],
                            SyntaxConfig(other_number=1.0, stack=1.0))
    assert out == [] and stats["stacked"] == 0


def test_inserted_length():
    src = "the boy likes it .".split()
    assert inserted_length(src, "the boy near the cars likes it .".split()) == 3
    assert inserted_length(src, "the boy near the cars like it .".split()) is None  # the verb changed
    assert inserted_length(src, src) is None
    assert inserted_length(src, "near the cars the boy likes it .".split()) == 3


def test_the_parse_is_the_same_with_two_processes(tmp_path):
    from agreelens.config import Params
    from agreelens.syntax import run_parse

    (tmp_path / "prepared").mkdir()
    lines = ["the boy likes the girls .", "the keys to the cabinet are on the table .",
             "the dogs near the house bark .", "my sister who lives in paris works at a bank ."] * 6
    (tmp_path / "prepared" / "train_large.txt").write_text("".join(f"{x}\n" for x in lines))
    base = Params()
    out = {}
    for n in (1, 2):
        syntax = base.syntax.model_copy(update={"parsed": str(tmp_path / f"parsed{n}"), "batch_size": 1, "processes": n})
        params = base.model_copy(update={"syntax": syntax,
                                         "prepare": base.prepare.model_copy(update={"out": str(tmp_path / "prepared")})})
        st = run_parse(params, progress=False)
        assert st["processes"] == n and st["sentences"] == 24
        out[n] = (tmp_path / f"parsed{n}" / "train_large.jsonl").read_text()
    assert out[1] == out[2] and '"sites": [[1, 2, "S"]]' in out[1]
