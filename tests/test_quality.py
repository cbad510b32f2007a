"""Data-quality gates (agreelens.quality): planted defects fail exactly their expectation; clean data passes."""

import json
from pathlib import Path

import pytest
import yaml

from agreelens.config import load_params
from agreelens.quality import QualityGateError, validate
from conftest import ROOT, run_cli

SUBJECTS = "boy girl man woman child teacher student doctor friend guy kid dog cat player".split()
VERBS = "likes sees knows helps wants needs loves makes takes gets calls keeps".split()
OBJECTS = "house car tree door window school city road store building book letter".split()


def _sentences(n: int, offset: int = 0) -> list[str]:
    """n distinct plain sentences of 6 tokens (5 words and a full stop)."""
    out = []
    for i in range(offset, offset + n):
        s, v, o = SUBJECTS[i % 14], VERBS[(i // 14) % 12], OBJECTS[(i // 168) % 12]
        out.append(f"The {s} {v} the {o}.")
    return out


@pytest.fixture()
def proj(tmp_path, monkeypatch) -> Path:
    """A clean mini project: corpora, prepared/vocab.txt + train_large.txt, augmented/pairs.tsv."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["quality"].update(min_total_tokens=1000, length_mostly=0.999, charset_mostly=0.999)
    raw["data"]["corpora"] = ["tatoeba", "onestopenglish"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    tat = tmp_path / "data" / "tatoeba"
    tat.mkdir(parents=True)
    (tat / "eng.txt").write_text("\n".join(_sentences(300)) + "\n", encoding="utf-8")
    for i, level in enumerate(("ele", "int", "adv")):
        d = tmp_path / "data" / "onestopenglish" / level
        d.mkdir(parents=True)
        (d / "story.txt").write_text(" ".join(_sentences(20, 300 + 20 * i)) + "\n", encoding="utf-8")
    p = load_params(tmp_path / "params.yaml")
    prep = tmp_path / "prepared"
    prep.mkdir()
    lexicon = {w for pool in ("nouns", "verbs", "adverbs", "manner_adverbs", "prepositions", "names", "location_nouns")
               for e in getattr(p.stimuli, pool) for w in (e if isinstance(e, list) else [e])}
    (prep / "vocab.txt").write_text("\n".join(["<eos>", "<unk>", "the", ".", *sorted(lexicon)]) + "\n", encoding="utf-8")
    (prep / "train_large.txt").write_text("the boy likes the car .\n", encoding="utf-8")
    aug = tmp_path / "augmented"
    aug.mkdir()
    pairs = [f"the {s} likes the car .\tthe {s} likes the house ." for s in SUBJECTS]
    (aug / "pairs.tsv").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _failed(root: Path, suite: str) -> tuple[list[str], str, dict]:
    with pytest.raises(QualityGateError) as err:
        validate(load_params(root / "params.yaml"), suite, root)
    msg = str(err.value)
    assert f"reports/quality/{suite}.md" in msg
    summary = json.loads((root / "reports" / "quality" / f"{suite}.json").read_text(encoding="utf-8"))
    assert summary == json.loads(json.dumps(err.value.summary))
    return summary["failed"], msg, summary


def _entry(summary: dict, name: str) -> dict:
    return next(e for e in summary["expectations"] if e["name"] == name)


def test_clean_corpus_passes_both_suites(proj):
    p = load_params(proj / "params.yaml")
    raw = validate(p, "raw", proj)
    assert raw["success"] and raw["failed"] == []
    assert raw["tables"] == {"files": 6, "sentences": 360, "lexicon": 125}
    assert _entry(raw, "total_tokens")["observed"] == 360 * 6
    assert _entry(raw, "duplicate_rate")["observed"] == 1.0
    aug = validate(p, "augmented", proj)
    assert aug["success"] and _entry(aug, "replacement_rate")["observed"] == 1.0
    assert [e["name"] for e in aug["expectations"]] == [
        "pairs_present", "pairs_well_formed", "no_empty_lines", "no_special_pieces", "replacement_rate",
        "same_length", "length_mean"]
    md = (proj / "reports" / "quality" / "raw.md").read_text(encoding="utf-8")
    assert "PASSED" in md and "| charset | sentences.text | pass |" in md


@pytest.mark.parametrize(
    "defect, content, expectation",
    [
        ("empty", b"  \n\n", "file_not_empty"),
        ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\xff", "file_no_nul"),
        ("latin1", "The café is near the school.\n".encode("latin-1"), "file_utf8"),
    ],
)
def test_bad_file_fails_exactly_its_expectation(proj, defect, content, expectation):
    (proj / "data" / "tatoeba" / f"{defect}.txt").write_bytes(content)
    failed, msg, summary = _failed(proj, "raw")
    assert failed == [expectation]
    assert expectation in msg
    ex = _entry(summary, expectation)["examples"]
    assert [e["file"] for e in ex] == [f"data/tatoeba/{defect}.txt"]
    md = (proj / "reports" / "quality" / "raw.md").read_text(encoding="utf-8")
    assert f"## {expectation} failed" in md and f"`data/tatoeba/{defect}.txt`" in md


def test_duplicates_fail_duplicate_rate(proj):
    path = proj / "data" / "tatoeba" / "eng.txt"
    sents = _sentences(150)
    path.write_text("\n".join(sents + sents) + "\n", encoding="utf-8")  # 50 % duplicates
    failed, msg, summary = _failed(proj, "raw")
    assert failed == ["duplicate_rate"] and "duplicate_rate" in msg
    e = _entry(summary, "duplicate_rate")
    assert e["observed"] == pytest.approx((150 + 60) / (300 + 60))
    assert len(e["examples"]) == 5 and e["examples"][0]["value"] == "2 copies"
    assert e["examples"][0]["file"] == "data/tatoeba/eng.txt" and e["examples"][0]["line"] >= 1


def test_sentence_length_charset_tokens_and_lexicon(proj):
    q = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    q["quality"].update(length_mostly=1.0, charset_mostly=1.0, min_total_tokens=10**6, min_lexicon_coverage=1.0)
    (proj / "params.yaml").write_text(yaml.safe_dump(q, allow_unicode=True), encoding="utf-8")
    path = proj / "data" / "tatoeba" / "eng.txt"
    path.write_text(path.read_text(encoding="utf-8") + " ".join(["word"] * 90) + "\nThe boy saw ☃ here.\n",
                    encoding="utf-8")
    vocab = proj / "prepared" / "vocab.txt"
    vocab.write_text(vocab.read_text(encoding="utf-8").replace("\nboys\n", "\n"), encoding="utf-8")
    failed, _, summary = _failed(proj, "raw")
    assert failed == ["sentence_length", "charset", "total_tokens", "lexicon_coverage"]
    assert _entry(summary, "sentence_length")["examples"][0] == {
        "file": "data/tatoeba/eng.txt", "line": 301, "text": " ".join(["word"] * 90), "value": 90}
    assert _entry(summary, "charset")["examples"][0]["value"] == "☃"
    assert [e["text"] for e in _entry(summary, "lexicon_coverage")["examples"]] == ["boys"]


def test_missing_prepared_vocab_is_reported(proj):
    (proj / "prepared" / "vocab.txt").unlink()
    failed, _, summary = _failed(proj, "raw")
    assert failed == ["file_exists", "lexicon_coverage"]
    assert "agreelens prepare" in _entry(summary, "file_exists")["examples"][0]["text"]


def test_mask_left_in_augmented_text(proj):
    path = proj / "augmented" / "pairs.tsv"
    path.write_text(path.read_text(encoding="utf-8") + "the boy likes the tree .\tthe boy [MASK] the tree .\n",
                    encoding="utf-8")
    failed, msg, summary = _failed(proj, "augmented")
    assert failed == ["no_special_pieces"] and "no_special_pieces" in msg
    (ex,) = _entry(summary, "no_special_pieces")["examples"]
    assert (ex["file"], ex["line"], ex["value"]) == ("augmented/pairs.tsv", 15, "the boy [MASK] the tree .")


@pytest.mark.parametrize(
    "line, expectation",
    [
        ("", "no_empty_lines"),
        ("the boy likes the tree .", "pairs_well_formed"),
        ("the boy likes the tree .\tthe boy likes the tree .", "replacement_rate"),  # unchanged
        ("the boy likes the tree .\tthe girl loves my tree .", "replacement_rate"),  # 3 of 6 changed is ok ...
        ("the boy likes the tree .\ta girl loves my house .", "replacement_rate"),  # ... 4 of 6 is not
        ("the boy likes the tree .\tthe boy ##s likes the tree .", "no_special_pieces,same_length"),
    ],
)
def test_augmented_defects(proj, line, expectation):
    path = proj / "augmented" / "pairs.tsv"
    path.write_text(path.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    if line.endswith("the girl loves my tree ."):
        assert validate(load_params(proj / "params.yaml"), "augmented", proj)["success"]
        return
    failed, _, _ = _failed(proj, "augmented")
    assert failed == expectation.split(",")


def test_length_mean_with_tolerant_pair_check(proj):
    q = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    q["quality"].update(length_equal_mostly=0.5)
    (proj / "params.yaml").write_text(yaml.safe_dump(q, allow_unicode=True), encoding="utf-8")
    path = proj / "augmented" / "pairs.tsv"
    path.write_text(path.read_text(encoding="utf-8") + "the boy likes the tree .\tthe big boy likes the tall tree .\n" * 3,
                    encoding="utf-8")
    failed, _, summary = _failed(proj, "augmented")
    assert failed == ["length_mean"]
    assert _entry(summary, "length_mean")["examples"][0]["value"] == "6 -> 8 tokens"


def test_augmentation_off_needs_no_pairs(proj):
    """``augment.enabled: false`` leaves an empty pairs file: the gate passes it, and a defect still fails."""
    q = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    q["augment"]["enabled"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(q, allow_unicode=True), encoding="utf-8")
    path = proj / "augmented" / "pairs.tsv"
    path.write_text("", encoding="utf-8")
    summary = validate(load_params(proj / "params.yaml"), "augmented", proj)
    assert summary["success"] and summary["tables"] == {"pairs": 0}
    assert "pairs_present" not in [e["name"] for e in summary["expectations"]]
    path.write_text("the boy likes the tree .\tthe boy [MASK] the tree .\n", encoding="utf-8")
    assert _failed(proj, "augmented")[0] == ["no_special_pieces"]


def test_missing_pairs_file_names_it(proj):
    (proj / "augmented" / "pairs.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="augmented/pairs.tsv.*augment stage"):
        validate(load_params(proj / "params.yaml"), "augmented", proj)


def test_unknown_suite(proj):
    with pytest.raises(ValueError, match="unknown quality suite 'nope'"):
        validate(load_params(proj / "params.yaml"), "nope", proj)


def test_cli_validate_fails_with_report(proj):
    (proj / "data" / "tatoeba" / "bad.txt").write_bytes(b"na\xefve\n")
    bad = run_cli(["validate", "--suite", "raw"], cwd=proj, check=False)
    assert bad.returncode == 1
    assert "file_utf8" in bad.stdout and "FAIL" in bad.stdout  # the results table
    err = " ".join(bad.stderr.split())  # rich wraps long lines
    assert "quality gate 'raw' failed: file_utf8; see reports/quality/raw.md" in err
    assert (proj / "reports" / "quality" / "raw.json").is_file()
