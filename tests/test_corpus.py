import json
from pathlib import Path

import pytest
import yaml

from agreelens.config import resolve
from agreelens.corpus import CorpusError, assign_split, prepare, subset_by_tokens
from agreelens.data import restore
from tests.conftest import ROOT


def _params(root, **prepare_kw):
    return resolve({"data": {"root": str(root), "corpora": ["tatoeba", "onestopenglish"]},
                    "prepare": {"out": str(root.parent / "prepared"), "min_count": 1, **prepare_kw}})


def _toy(root: Path):
    (root / "tatoeba").mkdir(parents=True)
    lines = [f"The boy number {i} greets the girls." for i in range(200)] + ["Tom runs. Mary walks."]
    (root / "tatoeba" / "eng.txt").write_text("\n".join(lines) + "\n")
    for level in ("ele", "int", "adv"):
        d = root / "onestopenglish" / level
        d.mkdir(parents=True)
        for slug in ("alpha", "beta", "gamma", "delta"):
            (d / f"{slug}.txt").write_text(f"This is {slug} at level {level}. It has two sentences.\n")
    return root


def test_prepare_splits_articles_by_document(tmp_path):
    root = _toy(tmp_path / "data")
    p = _params(root, valid_frac=0.3, test_frac=0.3)
    stats = prepare(p, metrics_path=tmp_path / "m.json")
    out = tmp_path / "prepared"
    where = {}
    for split in ("train_large", "valid", "test"):
        for line in (out / f"{split}.txt").read_text().splitlines():
            words = line.split()
            if words[:2] == ["this", "is"]:
                where.setdefault(words[2], set()).add(split)
    assert set(where) == {"alpha", "beta", "gamma", "delta"}
    assert all(len(s) == 1 for s in where.values()), where  # all three levels of an article together
    assert json.loads((tmp_path / "m.json").read_text()) == stats
    assert stats["splits"]["train"]["tokens"] == stats["models"]["large"]["tokens"]
    assert 0.4 < stats["models"]["small"]["tokens"] / stats["models"]["large"]["tokens"] < 0.6
    # "Tom runs. Mary walks." was split into two sentences
    text = " ".join((out / f).read_text() for f in ("train_large.txt", "valid.txt", "test.txt"))
    assert "tom runs ." in text and "mary walks ." in text


def test_split_assignment_is_stable_and_proportional():
    keys = [f"k{i}" for i in range(5000)]
    first = [assign_split(k, 1, 0.1, 0.1) for k in keys]
    assert first == [assign_split(k, 1, 0.1, 0.1) for k in keys]
    assert 0.08 < first.count("test") / 5000 < 0.12 and 0.08 < first.count("valid") / 5000 < 0.12


def test_subset_by_tokens_takes_a_prefix_of_about_the_fraction():
    sents = [["w"] * 9 for _ in range(100)]  # 10 tokens each with <eos>
    sub = subset_by_tokens(sents, 0.5)
    assert len(sub) == 50 and sub == sents[:50]
    assert subset_by_tokens(sents, 1.0) is sents


@pytest.mark.parametrize("defect,content,expected", [
    ("missing", None, "missing"),
    ("empty", b"  \n", "empty"),
    ("binary", b"\x00\x01\x02PK\x03\x04", "binary"),
    ("latin1", "Caf\u00e9 au lait.\n".encode("latin-1"), "not valid UTF-8"),
])
def test_bad_corpus_file_stops_preparation_naming_it(tmp_path, defect, content, expected):
    root = _toy(tmp_path / "data")
    bad = root / "tatoeba" / "eng.txt"
    if content is None:
        bad.unlink()
        bad = root / "tatoeba"
    else:
        bad.write_bytes(content)
    out = tmp_path / "prepared"
    with pytest.raises(CorpusError, match=expected) as err:
        prepare(_params(root), metrics_path=tmp_path / "m.json")
    assert str(bad) in str(err.value)
    assert not out.exists() and not (tmp_path / "m.json").exists()
    assert not list(tmp_path.glob(".prepared*"))  # no half-written temporary output left behind


def test_restore_rebuilds_what_data_dvc_records(tmp_path):
    root = tmp_path / "data"
    restored = restore(root, ROOT / "corpora")
    assert {"tatoeba", "onestopenglish", "wikitext2", "blimp", "SOURCES.md"} <= set(restored)
    record = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    files = [f for f in root.rglob("*") if f.is_file()]
    assert len(files) == record["nfiles"]
    assert sum(f.stat().st_size for f in files) == record["size"]
    assert restore(root, ROOT / "corpora") == []  # never overwrites what is there
