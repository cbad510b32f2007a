"""Raw learner corpora -> tokenized train/valid/test splits, vocabulary and statistics.

Corpora (under ``data/``, DVC-tracked by ``data.dvc``):
- ``tatoeba/*.txt``: one example sentence per line; split unit = sentence.
- ``onestopenglish/{ele,int,adv}/SLUG.txt``: one paragraph per line; the three reading levels of an
  article share its slug and always land in the same split.
- ``wikitext2/{train,valid,test}.txt`` (optional): keeps its own standard splits.

Every file is checked before anything is written: a missing, empty, binary or non-UTF-8 file stops
preparation with one message naming it. Outputs are written to a temporary directory and moved into
place at the end, so a failed run leaves no half-written stage output.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agreelens.text import split_sentences, tokenize
from agreelens.vocab import UNK, Vocab

if TYPE_CHECKING:
    from agreelens.config import Params

SPLITS = ("train", "valid", "test")


class CorpusError(ValueError):
    """A corpus file is unusable; the message names the file and what to do."""


@dataclass
class Unit:
    """The smallest piece of text that is assigned to one split (a sentence or a whole article)."""

    corpus: str
    key: str
    sentences: list[list[str]] = field(default_factory=list)
    split: str | None = None  # fixed split (WikiText-2), else assigned by hash


def read_text(path: Path) -> str:
    """Read a UTF-8 text file or raise CorpusError naming it."""
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file is missing; restore the data with `agreelens data`")
    raw = path.read_bytes()
    if not raw.strip():
        raise CorpusError(f"{path}: corpus file is empty; remove it or add text")
    if b"\x00" in raw[:65536]:
        raise CorpusError(f"{path}: looks like a binary file (NUL bytes); corpora must be plain UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path}: not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _files(folder: Path, pattern: str) -> list[Path]:
    if not folder.is_dir():
        raise CorpusError(f"{folder}: corpus folder is missing; restore the data with `agreelens data`")
    files = sorted(folder.glob(pattern))
    if not files:
        raise CorpusError(f"{folder}: corpus files missing (no {pattern}); restore the data with `agreelens data`")
    return files


def raw_sentences(paragraphs):
    """``(sentence text, tokens)`` of each non-empty sentence of the paragraphs, in order."""
    for para in paragraphs:
        for sent in split_sentences(para):
            toks = tokenize(sent)
            if toks:
                yield sent, toks


def _tokenized(paragraphs, limit: int) -> list[list[str]]:
    out = []
    for _, toks in raw_sentences(paragraphs):
        out.append(toks)
        if limit and len(out) >= limit:
            break
    return out


def read_tatoeba(root: Path, limit: int = 0) -> list[Unit]:
    units = []
    for path in _files(root / "tatoeba", "*.txt"):
        for i, toks in enumerate(_tokenized(read_text(path).splitlines(), limit)):
            units.append(Unit("tatoeba", f"{path.stem}:{i}", [toks]))
    return units


def read_onestopenglish(root: Path, limit: int = 0) -> list[Unit]:
    by_slug: dict[str, Unit] = {}
    n = 0
    for level in ("ele", "int", "adv"):
        for path in _files(root / "onestopenglish" / level, "*.txt"):
            sents = _tokenized(read_text(path).splitlines(), 0)
            unit = by_slug.setdefault(path.stem, Unit("onestopenglish", path.stem))
            unit.sentences.extend(sents)
            n += len(sents)
        if limit and n >= limit:
            break
    return list(by_slug.values())


_WIKI_AT = re.compile(r" @(.)@ ")
_WIKI_UNK = "wikitextunk"


def read_wikitext2(root: Path, limit: int = 0) -> list[Unit]:
    units = []
    for split in SPLITS:
        path = root / "wikitext2" / f"{split}.txt"
        text = read_text(path)
        paragraphs = [
            _WIKI_AT.sub(r"\1", line.replace("<unk>", _WIKI_UNK))
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("=")
        ]
        unit = Unit("wikitext2", split, split=split)
        unit.sentences = [
            [UNK if t == _WIKI_UNK else t for t in sent] for sent in _tokenized(paragraphs, limit)
        ]
        units.append(unit)
    return units


READERS = {"tatoeba": read_tatoeba, "onestopenglish": read_onestopenglish, "wikitext2": read_wikitext2}


def assign_split(key: str, seed: int, valid_frac: float, test_frac: float) -> str:
    """Stable split by hashing the unit's key: adding a document never moves the others."""
    h = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    if h < test_frac:
        return "test"
    if h < test_frac + valid_frac:
        return "valid"
    return "train"


def split_units(units: list[Unit], params: Params) -> dict[str, list[list[str]]]:
    p = params.prepare
    splits: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    for unit in units:
        split = unit.split or assign_split(f"{unit.corpus}/{unit.key}", p.seed, p.valid_frac, p.test_frac)
        splits[split].extend(unit.sentences)
    # corpora come sorted (Tatoeba by length, articles by name): shuffle sentence order once, seeded
    for name, sents in splits.items():
        random.Random(f"{p.seed}:{name}").shuffle(sents)
    return splits


def subset_by_tokens(sentences: list[list[str]], fraction: float) -> list[list[str]]:
    """The first sentences of the (already shuffled) split holding ``fraction`` of its tokens."""
    if fraction >= 1:
        return sentences
    total = sum(len(s) + 1 for s in sentences)
    budget, n, out = fraction * total, 0, []
    for sent in sentences:
        if n >= budget:
            break
        out.append(sent)
        n += len(sent) + 1
    return out


def split_stats(sentences: list[list[str]], vocab: Vocab) -> dict:
    tokens = sum(len(s) + 1 for s in sentences)  # + <eos>
    oov = sum(1 for s in sentences for t in s if t not in vocab.stoi)
    types = len({t for s in sentences for t in s})
    return {
        "sentences": len(sentences),
        "tokens": tokens,
        "types": types,
        "oov_rate": round(oov / max(tokens, 1), 5),
    }


def _write_lines(path: Path, sentences: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s in sentences:
            f.write(" ".join(s) + "\n")


def prepare(params: Params, metrics_path: str | Path = "metrics/prepare.json", progress=None) -> dict:
    """Read, check, split, tokenize; write ``<out>/{train_<size>,valid,test}.txt`` + ``vocab.txt``."""
    d, p = params.data, params.prepare
    root = Path(d.root)
    units: list[Unit] = []
    for name in d.corpora:
        read = READERS[name]
        if progress:
            progress(f"reading {name}")
        units.extend(read(root, d.max_sentences))
    splits = split_units(units, params)
    for name, sents in splits.items():
        if not sents:
            raise CorpusError(f"{root}: the {name} split is empty; add text or raise prepare.{name}_frac")

    counts = Counter(t for s in splits["train"] for t in s)
    counts["<eos>"] = len(splits["train"])
    vocab = Vocab.build(counts, p.min_count, p.max_vocab)

    out = Path(p.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    stats: dict = {"vocab_size": len(vocab), "corpora": list(d.corpora), "splits": {}, "models": {}}
    try:
        for name in ("valid", "test"):
            _write_lines(tmp / f"{name}.txt", splits[name])
            stats["splits"][name] = split_stats(splits[name], vocab)
        stats["splits"]["train"] = split_stats(splits["train"], vocab)
        for size, frac in p.sizes.items():
            subset = subset_by_tokens(splits["train"], frac)
            _write_lines(tmp / f"train_{size}.txt", subset)
            stats["models"][size] = {"fraction": frac, **split_stats(subset, vocab)}
        vocab.save(tmp / "vocab.txt")
        with open(tmp / "counts.tsv", "w", encoding="utf-8") as f:  # training-split word counts
            f.writelines(f"{w}\t{c}\n" for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    metrics_path = Path(metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def read_split(path: str | Path) -> list[str]:
    """A prepared split: whitespace-tokenized sentences, one per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared split missing; run `agreelens prepare` (or `dvc repro`)")
    return path.read_text(encoding="utf-8").splitlines()


def read_counts(path: str | Path) -> dict[str, int]:
    """Training-split word counts written by :func:`prepare` (``counts.tsv``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: word counts missing; run `agreelens prepare` (or `dvc repro`)")
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        word, _, count = line.rpartition("\t")
        out[word] = int(count)
    return out
