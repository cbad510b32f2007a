"""NA-task stimuli: minimal pairs, balance, determinism, lexical constraints, vocabulary handling, files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from agreelens.stimuli import CONSTRUCTIONS, POOLS, StimuliConfig, conditions, generate, write
from agreelens.text import tokenize
from agreelens.vocab import Vocab

N = 40
EXPECTED_CONDITIONS = {
    "simple": ["S", "P"],
    "adv": ["S", "P"],
    "adv_adv": ["S", "P"],
    "adv_conjunction": ["S", "P"],
    "namepp": ["S", "P"],
    "nounpp": ["SS", "SP", "PS", "PP"],
    "nounpp_adv": ["SS", "SP", "PS", "PP"],
}


@pytest.fixture(scope="module")
def cfg() -> StimuliConfig:
    return StimuliConfig(n_per_condition=N)


@pytest.fixture(scope="module")
def generated(cfg):
    return generate(cfg)


@pytest.fixture(scope="module")
def written(generated, tmp_path_factory):
    out = tmp_path_factory.mktemp("stim") / "na"
    return out, write(generated[0], out)


def all_words(cfg: StimuliConfig) -> set[str]:
    words = set()
    for pool in POOLS:
        for entry in getattr(cfg, pool):
            words.update(entry if isinstance(entry, list) else [entry])
    return words


def test_constructions_and_conditions_are_the_papers():
    assert list(CONSTRUCTIONS) == list(EXPECTED_CONDITIONS)
    for c, conds in EXPECTED_CONDITIONS.items():
        assert conditions(c) == conds


def test_conditions_balanced(generated):
    records, report = generated
    counts = Counter((r["construction"], r["condition"]) for r in records)
    expected = {(c, cond): N for c, conds in EXPECTED_CONDITIONS.items() for cond in conds}
    assert dict(counts) == expected
    assert report["counts"] == {c: {cond: N for cond in conds} for c, conds in EXPECTED_CONDITIONS.items()}
    assert report["shortfall"] == []
    assert report["n_records"] == len(records) == 18 * N


def test_pairs_differ_in_one_word_at_the_gold_position(written):
    out, _ = written
    n_checked = 0
    for c in CONSTRUCTIONS:
        gold = [line.split("\t") for line in (out / f"{c}.gold").read_text().splitlines()]
        text = (out / f"{c}.text").read_text().splitlines()
        pairs = [json.loads(line) for line in (out / f"{c}.jsonl").read_text().splitlines()]
        assert len(gold) == len(text) == len(pairs) == N * len(EXPECTED_CONDITIONS[c])
        for (pos, right, wrong), sentence, p in zip(gold, text, pairs):
            good, bad = tokenize(p["sentence_good"]), tokenize(p["sentence_bad"])
            assert sentence == p["sentence_good"]
            assert len(good) == len(bad)
            diff = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
            assert diff == [int(pos)]
            assert good[int(pos)] == right == p["one_prefix_word_good"]
            assert bad[int(pos)] == wrong == p["one_prefix_word_bad"]
            assert tokenize(p["one_prefix_prefix"]) == good[: int(pos)]
            assert p["UID"] == p["construction"] == c
            n_checked += 1
    assert n_checked == 18 * N


def test_verb_agrees_with_subject_and_attractor_matches_condition(cfg, generated):
    records, _ = generated
    singular = {e[0] for pool in ("nouns", "verbs", "location_nouns") for e in getattr(cfg, pool)}
    plural = {e[1] for pool in ("nouns", "verbs", "location_nouns") for e in getattr(cfg, pool)}
    for r in records:
        toks = tokenize(r["sentence_good"])
        subject, verb = toks[1], toks[r["verb_position"]]
        want = singular if r["condition"][0] == "S" else plural
        assert subject in want and verb in want, r
        assert r["subject_number"] == ("singular" if r["condition"][0] == "S" else "plural")
        if r["construction"].startswith("nounpp"):
            attractor = toks[4]  # the N prep the ATTR ...
            assert attractor in (singular if r["condition"][1] == "S" else plural), r
            assert r["attractor_number"] == ("singular" if r["condition"][1] == "S" else "plural")
        elif r["construction"] == "namepp":
            assert toks[3] in cfg.names and r["attractor_number"] == "singular"
        else:
            assert r["attractor_number"] is None


def test_sentences_unique_within_condition(generated):
    records, _ = generated
    seen = Counter((r["construction"], r["condition"], r["sentence_good"]) for r in records)
    assert max(seen.values()) == 1


def test_no_repeated_lemma(cfg, generated):
    records, _ = generated
    lemma = {}
    for pool in POOLS:
        for i, entry in enumerate(getattr(cfg, pool)):
            for form in entry if isinstance(entry, list) else [entry]:
                lemma[form] = (pool, i)
    for r in records:
        content = [lemma[t] for t in tokenize(r["sentence_good"]) if t not in ("the", "and")]
        assert len(content) == len(set(content)), r["sentence_good"]


def test_deterministic_under_seed(cfg, generated):
    again, _ = generate(cfg)
    assert again == generated[0]
    other, _ = generate(cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert [r["sentence_good"] for r in other] != [r["sentence_good"] for r in again]
    # same set of pairs per condition, just other draws: same shape
    assert Counter((r["construction"], r["condition"]) for r in other) == Counter(
        (r["construction"], r["condition"]) for r in again
    )


def test_fewer_combinations_than_requested_gives_all_and_reports():
    cfg = StimuliConfig(
        n_per_condition=100,
        constructions=["simple"],
        nouns=[["boy", "boys"], ["girl", "girls"]],
        verbs=[["likes", "like"]],
    )
    records, report = generate(cfg)
    # subject (2) x object (the other noun, 2 numbers) = 4 sentences per condition
    assert report["counts"] == {"simple": {"S": 4, "P": 4}}
    assert report["shortfall"] == [
        {"construction": "simple", "condition": "S", "requested": 100, "produced": 4},
        {"construction": "simple", "condition": "P", "requested": 100, "produced": 4},
    ]
    assert sorted(r["sentence_good"] for r in records if r["condition"] == "S") == [
        "the boy likes the girl",
        "the boy likes the girls",
        "the girl likes the boy",
        "the girl likes the boys",
    ]


def test_oov_reported_and_restricted(cfg):
    missing = {"boys", "likes", "tom", "roads", "probably"}
    vocab = Vocab(["<eos>", "<unk>", "the", "and"] + sorted(all_words(cfg) - missing))
    records, report = generate(cfg, vocab)
    assert report["oov"]["nouns"] == ["boys"]
    assert report["oov"]["verbs"] == ["likes"]
    assert report["oov"]["names"] == ["tom"]
    assert report["oov"]["location_nouns"] == ["roads"]
    assert report["oov"]["adverbs"] == ["probably"]
    assert report["oov"]["function_words"] == []
    assert report["dropped"]["nouns"] == [["boy", "boys"]]
    assert report["dropped"]["verbs"] == [["likes", "like"]]
    assert report["dropped"]["location_nouns"] == [["road", "roads"]]
    assert report["pool_sizes"]["nouns"] == len(cfg.nouns) - 1
    banned = missing | {"boy", "like", "road"}
    for r in records:
        toks = tokenize(r["sentence_good"]) + tokenize(r["sentence_bad"])
        assert all(t in vocab for t in toks)
        assert not banned & set(toks)
    assert report["shortfall"] == [] and len(records) == 18 * N  # never fewer sentences

    kept, report2 = generate(cfg.model_copy(update={"restrict_to_vocab": False}), vocab)
    assert report2["oov"] == report["oov"] and "dropped" not in report2
    assert any("boy" in tokenize(r["sentence_good"]) for r in kept)


def test_no_vocab_no_oov_report(generated):
    assert generated[1]["oov"] is None


def test_pool_too_small_raises(cfg):
    vocab = Vocab(["<eos>", "<unk>", "the", "and"] + sorted(all_words(cfg) - {"girl", "man", "woman"}))
    small = cfg.model_copy(update={"nouns": [["boy", "boys"], ["girl", "girls"], ["man", "men"]]})
    with pytest.raises(ValueError, match=r"nouns has 1 usable entries, needs at least 2"):
        generate(small, vocab)
    no_the = Vocab(["<eos>", "<unk>", "and"] + sorted(all_words(cfg)))
    with pytest.raises(ValueError, match="the"):
        generate(cfg, no_the)
    # the names pool matters only for namepp
    no_names = cfg.model_copy(update={"names": [], "constructions": ["simple", "nounpp"]})
    assert generate(no_names)[1]["n_records"] == 6 * N
    with pytest.raises(ValueError, match="names has 0"):
        generate(cfg.model_copy(update={"names": []}))


def test_config_validation():
    with pytest.raises(ValidationError, match="single token"):
        StimuliConfig(prepositions=["next to"])
    with pytest.raises(ValidationError, match="must differ"):
        StimuliConfig(nouns=[["sheep", "sheep"], ["boy", "boys"]])
    with pytest.raises(ValidationError, match="unknown construction"):
        StimuliConfig(constructions=["simple", "relative_clause"])
    with pytest.raises(ValidationError):
        StimuliConfig(n_per_conditon=3)  # extra fields are forbidden
    assert StimuliConfig(names=["Tom"]).names == ["tom"]  # stored as tokenized


def test_config_round_trips_through_yaml(cfg):
    text = yaml.safe_dump(cfg.model_dump())
    assert StimuliConfig(**yaml.safe_load(text)) == cfg


def test_write_produces_four_files_per_construction(written):
    out, paths = written
    expected = {f"{c}.{ext}" for c in CONSTRUCTIONS for ext in ("text", "gold", "info", "jsonl")}
    assert {p.name for p in paths} == expected
    assert all(p.parent == out and p.is_file() for p in paths)
    assert {p.name for p in out.iterdir()} == expected
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_info_is_json_lines(written):
    out, _ = written
    for c in CONSTRUCTIONS:
        rows = [json.loads(line) for line in (out / f"{c}.info").read_text().splitlines()]
        assert len(rows) == N * len(EXPECTED_CONDITIONS[c])
        assert [r["id"] for r in rows] == list(range(len(rows)))
        for r in rows:
            assert set(r) == {"construction", "condition", "subject_number", "attractor_number", "id"}
            assert r["construction"] == c
        if c in ("simple", "adv"):
            assert all(r["attractor_number"] is None for r in rows)
        pairs = [json.loads(line) for line in (out / f"{c}.jsonl").read_text().splitlines()]
        assert [p["pairID"] for p in pairs] == [str(r["id"]) for r in rows]
        assert [p["condition"] for p in pairs] == [r["condition"] for r in rows]


def test_write_replaces_previous_output(tmp_path: Path, generated):
    records, _ = generated
    out = tmp_path / "na"
    write(records, out)
    (out / "stale.txt").write_text("old")
    paths = write([r for r in records if r["construction"] == "simple"], out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths) == [
        "simple.gold", "simple.info", "simple.jsonl", "simple.text",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["na"]
    with pytest.raises(ValueError):
        write([], out)
    assert (out / "simple.text").is_file()  # a failed write leaves the previous files alone


def test_min_count_drops_rare_number_words_and_reports_them():
    from agreelens.stimuli import StimuliConfig, generate

    cfg = StimuliConfig(n_per_condition=3, constructions=["simple", "nounpp"], min_count=10)
    counts = {w: 100 for pool in ("nouns", "verbs", "location_nouns") for pair in getattr(cfg, pool) for w in pair}
    rare_noun, rare_verb = cfg.nouns[0], cfg.verbs[0]
    counts[rare_noun[1]] = 9  # its plural seen 9 times: below the bar
    counts.pop(rare_verb[0])  # never seen at all
    records, report = generate(cfg, None, counts)
    words = {w for r in records for w in r["sentence_good"].split() + r["sentence_bad"].split()}
    assert not set(rare_noun) & words and not set(rare_verb) & words
    assert f"{rare_noun[1]}=9" in report["rare"]["nouns"] and f"{rare_verb[0]}=0" in report["rare"]["verbs"]
    assert report["pool_sizes"]["nouns"] == len(cfg.nouns) - 1
    with pytest.raises(ValueError, match="seen fewer than 1000 times"):
        generate(cfg.model_copy(update={"min_count": 1000}), None, counts)
