"""Number-agreement (NA) task stimuli in the style of Lakretz et al. (2019).

Seven constructions, each a template around a subject noun and the verb that agrees with it::

    simple           the boy likes the guy                        S / P
    adv              the boy probably likes the guy               S / P
    adv_adv          the boy probably really likes the guy        S / P
    adv_conjunction  the boy gently and kindly likes the guy      S / P
    namepp           the boy near tom likes the guy               S / P
    nounpp           the boy near the cars likes the guy          SS / SP / PS / PP
    nounpp_adv       the boy near the cars probably likes the guy SS / SP / PS / PP

Condition letters are the subject's number, then the attractor's (S = singular, P = plural). A
stimulus is a minimal pair: the good sentence has the verb form that agrees with the subject, the bad
one the other form; nothing else differs. The object after the verb is a noun from the same animate
pool, in a number drawn at random. No word (lemma) appears twice in a sentence, every sentence within
a condition is unique, and the whole set is a function of the settings (seed included).

Lexicon pools are lists (of ``[singular, plural]`` pairs where number matters) so that they serialise
to YAML. Every pool word must be one token under :func:`agreelens.text.tokenize` (words are stored as
tokenized, i.e. lowercased). Given a :class:`~agreelens.vocab.Vocab`, :func:`generate` reports the
pool words the LM does not know and, with ``restrict_to_vocab``, leaves those entries out of the pools
*before* drawing sentences, so no sentence is ever dropped afterwards.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agreelens.text import tokenize
from agreelens.vocab import Vocab

CONSTRUCTIONS: tuple[str, ...] = (
    "simple",
    "adv",
    "adv_adv",
    "adv_conjunction",
    "namepp",
    "nounpp",
    "nounpp_adv",
)

# template items: a literal word, or a slot "{name}"; "{verb}" is the agreeing verb
TEMPLATES: dict[str, tuple[str, ...]] = {
    "simple": ("the", "{subj}", "{verb}", "the", "{obj}"),
    "adv": ("the", "{subj}", "{adv1}", "{verb}", "the", "{obj}"),
    "adv_adv": ("the", "{subj}", "{adv1}", "{adv2}", "{verb}", "the", "{obj}"),
    "adv_conjunction": ("the", "{subj}", "{madv1}", "and", "{madv2}", "{verb}", "the", "{obj}"),
    "namepp": ("the", "{subj}", "{prep}", "{name}", "{verb}", "the", "{obj}"),
    "nounpp": ("the", "{subj}", "{prep}", "the", "{attr}", "{verb}", "the", "{obj}"),
    "nounpp_adv": ("the", "{subj}", "{prep}", "the", "{attr}", "{adv1}", "{verb}", "the", "{obj}"),
}

# slot -> the pool it draws from
SLOT_POOLS: dict[str, str] = {
    "subj": "nouns",
    "obj": "nouns",
    "verb": "verbs",
    "adv1": "adverbs",
    "adv2": "adverbs",
    "madv1": "manner_adverbs",
    "madv2": "manner_adverbs",
    "prep": "prepositions",
    "name": "names",
    "attr": "location_nouns",
}

PAIR_POOLS = ("nouns", "verbs", "location_nouns")
WORD_POOLS = ("adverbs", "manner_adverbs", "prepositions", "names")
POOLS = PAIR_POOLS + WORD_POOLS

NUMBERS = {"S": "singular", "P": "plural"}
_FORM = {"S": 0, "P": 1}

# list every possible sentence (rather than draw at random) when there are at most this many
_ENUMERATE_LIMIT = 50_000


def _slots(construction: str) -> list[str]:
    return [item[1:-1] for item in TEMPLATES[construction] if item.startswith("{")]


def conditions(construction: str) -> list[str]:
    """``['S', 'P']`` or, with a noun attractor, ``['SS', 'SP', 'PS', 'PP']``."""
    if "attr" in _slots(construction):
        return ["SS", "SP", "PS", "PP"]
    return ["S", "P"]


def _one_token(word: Any, where: str) -> str:
    if not isinstance(word, str):
        raise ValueError(f"{where}: expected a word, got {word!r}")
    toks = tokenize(word)
    if len(toks) != 1:
        raise ValueError(f"{where}: {word!r} must be a single token, tokenizes to {toks}")
    return toks[0]


def _check_unique(entries: list, pool: str) -> None:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for form in entry if isinstance(entry, list) else [entry]:
            if form in seen and seen[form] != i:
                raise ValueError(f"{pool}: the word {form!r} appears in more than one entry")
            seen[form] = i


class StimuliConfig(BaseModel):
    """Settings of the NA-task stimuli (``stimuli`` in params.yaml)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 1
    n_per_condition: int = Field(200, ge=1)
    constructions: list[str] = list(CONSTRUCTIONS)
    restrict_to_vocab: bool = True
    # number-carrying pools (nouns, verbs, location nouns): each form must occur at least this often in
    # the training split, else the entry is dropped and reported (0 = off). A word-level LM learns a
    # form's number only from its contexts; a plural seen 7 times is a test of frequency, not agreement.
    min_count: int = Field(50, ge=0)
    # animate nouns: subjects and objects, [singular, plural]
    nouns: list[list[str]] = [
        ["boy", "boys"], ["girl", "girls"], ["man", "men"], ["woman", "women"], ["child", "children"],
        ["person", "people"], ["friend", "friends"], ["student", "students"], ["teacher", "teachers"],
        ["doctor", "doctors"], ["guy", "guys"], ["kid", "kids"], ["brother", "brothers"], ["sister", "sisters"],
        ["dog", "dogs"], ["cat", "cats"], ["player", "players"], ["scientist", "scientists"],
        ["leader", "leaders"], ["son", "sons"],
    ]
    # transitive verbs, [singular (3sg present), plural]
    verbs: list[list[str]] = [
        ["knows", "know"], ["likes", "like"], ["wants", "want"], ["needs", "need"], ["loves", "love"],
        ["makes", "make"], ["takes", "take"], ["gets", "get"], ["calls", "call"], ["leaves", "leave"],
        ["keeps", "keep"], ["hates", "hate"], ["helps", "help"], ["gives", "give"], ["shows", "show"],
    ]
    # sentence adverbs (adv, adv_adv, nounpp_adv)
    adverbs: list[str] = [
        "probably", "really", "certainly", "definitely", "usually",
        "always", "often", "never", "sometimes", "clearly",
    ]
    # manner adverbs, two joined by "and" (adv_conjunction)
    manner_adverbs: list[str] = [
        "gently", "kindly", "quickly", "quietly", "slowly",
        "happily", "openly", "politely", "warmly", "carefully",
    ]
    prepositions: list[str] = ["near", "behind", "beside", "with", "from"]
    # proper names (namepp attractors; always singular)
    names: list[str] = ["tom", "mary", "john", "alice", "jack", "paul", "kate", "mike", "bob", "jane"]
    # inanimate nouns (nounpp attractors), [singular, plural]
    location_nouns: list[list[str]] = [
        ["car", "cars"], ["tree", "trees"], ["city", "cities"], ["window", "windows"], ["house", "houses"],
        ["building", "buildings"], ["school", "schools"], ["door", "doors"], ["store", "stores"], ["road", "roads"],
    ]

    @field_validator("constructions")
    @classmethod
    def _known_constructions(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in TEMPLATES]
        if unknown:
            raise ValueError(f"unknown construction(s) {unknown}; known: {', '.join(CONSTRUCTIONS)}")
        if len(set(v)) != len(v):
            raise ValueError("constructions are listed more than once")
        return v

    @field_validator(*PAIR_POOLS)
    @classmethod
    def _pairs(cls, v: list[list[str]], info) -> list[list[str]]:
        out = []
        for i, entry in enumerate(v):
            where = f"{info.field_name}[{i}]"
            if len(entry) != 2:
                raise ValueError(f"{where}: expected [singular, plural], got {entry!r}")
            sg, pl = (_one_token(w, where) for w in entry)
            if sg == pl:
                raise ValueError(f"{where}: singular and plural forms must differ, got {entry!r}")
            out.append([sg, pl])
        _check_unique(out, info.field_name)
        return out

    @field_validator(*WORD_POOLS)
    @classmethod
    def _words(cls, v: list[str], info) -> list[str]:
        out = [_one_token(w, f"{info.field_name}[{i}]") for i, w in enumerate(v)]
        _check_unique(out, info.field_name)
        return out


def _forms(entry: str | list[str]) -> list[str]:
    return list(entry) if isinstance(entry, list) else [entry]


def _required_sizes(constructions: list[str]) -> dict[str, int]:
    """Smallest size of each pool the constructions need (slots drawing from one pool differ)."""
    need: dict[str, int] = {}
    for c in constructions:
        per_pool: dict[str, int] = {}
        for slot in _slots(c):
            per_pool[SLOT_POOLS[slot]] = per_pool.get(SLOT_POOLS[slot], 0) + 1
        for pool, k in per_pool.items():
            need[pool] = max(need.get(pool, 0), k)
    return need


def _literals(constructions: list[str]) -> list[str]:
    words = {w for c in constructions for w in TEMPLATES[c] if not w.startswith("{")}
    return sorted(words)


class _Sampler:
    """Draws unique, lemma-distinct slot fillings of one construction and condition."""

    def __init__(self, construction: str, pools: dict[str, list]):
        self.slots = _slots(construction)
        self.pools = pools
        self.sizes = [len(pools[SLOT_POOLS[s]]) for s in self.slots]
        # upper bound on distinct fillings: slots sharing a pool take distinct entries; object number x2
        bound = 2
        for pool in {SLOT_POOLS[s] for s in self.slots}:
            k = sum(SLOT_POOLS[s] == pool for s in self.slots)
            bound *= math.perm(len(pools[pool]), k)
        self.bound = bound

    def valid(self, choice: tuple[int, ...]) -> bool:
        seen: set[str] = set()
        n = 0
        for slot, idx in zip(self.slots, choice):
            forms = _forms(self.pools[SLOT_POOLS[slot]][idx])
            seen.update(forms)
            n += len(forms)
        return len(seen) == n

    def draw(self, n: int, rng: random.Random) -> list[tuple[tuple[int, ...], int]]:
        """``n`` unique (slot indices, object form) fillings, or all of them if fewer exist."""
        if self.bound <= max(_ENUMERATE_LIMIT, 4 * n):
            everything = [
                (choice, obj_form)
                for choice in itertools.product(*(range(k) for k in self.sizes))
                if self.valid(choice)
                for obj_form in (0, 1)
            ]
            if len(everything) <= n:
                rng.shuffle(everything)
                return everything
            return rng.sample(everything, n)
        out: list[tuple[tuple[int, ...], int]] = []
        seen: set[tuple[tuple[int, ...], int]] = set()
        attempts, max_attempts = 0, 100 * n + 10_000
        while len(out) < n:
            attempts += 1
            if attempts > max_attempts:  # only with pools that overlap each other almost entirely
                raise RuntimeError(f"could not draw {n} distinct sentences in {max_attempts} attempts")
            choice = tuple(rng.randrange(k) for k in self.sizes)
            item = (choice, rng.randrange(2))
            if item in seen or not self.valid(choice):
                continue
            seen.add(item)
            out.append(item)
        return out


def _record(construction: str, condition: str, idx: int, choice, obj_form: int, pools) -> dict:
    subj_form = _FORM[condition[0]]
    filled: dict[str, str] = {}
    verb_forms = None
    for slot, i in zip(_slots(construction), choice):
        entry = pools[SLOT_POOLS[slot]][i]
        if slot == "subj":
            filled[slot] = entry[subj_form]
        elif slot == "obj":
            filled[slot] = entry[obj_form]
        elif slot == "attr":
            filled[slot] = entry[_FORM[condition[1]]]
        elif slot == "verb":
            verb_forms = entry
        else:
            filled[slot] = entry
    good, bad = verb_forms[subj_form], verb_forms[1 - subj_form]
    words = [filled.get(item[1:-1], item) if item.startswith("{") else item for item in TEMPLATES[construction]]
    pos = words.index("{verb}")
    prefix = " ".join(words[:pos])
    suffix = " ".join(words[pos + 1 :])
    if "attr" in filled:
        attractor_number = NUMBERS[condition[1]]
    elif "name" in filled:
        attractor_number = "singular"  # a proper name is a singular intervening noun
    else:
        attractor_number = None
    return {
        "construction": construction,
        "condition": condition,
        "subject_number": NUMBERS[condition[0]],
        "attractor_number": attractor_number,
        "id": idx,
        "sentence_good": f"{prefix} {good} {suffix}",
        "sentence_bad": f"{prefix} {bad} {suffix}",
        "one_prefix_prefix": prefix,
        "one_prefix_word_good": good,
        "one_prefix_word_bad": bad,
        "verb_position": len(tokenize(prefix)),
        "UID": construction,
        "pairID": str(idx),
    }


NUMBER_POOLS = ("nouns", "verbs", "location_nouns")


def split_lexicon(cfg: StimuliConfig) -> dict[str, StimuliConfig]:
    """Two settings with disjoint halves of the number-carrying pools (nouns, verbs, location nouns):
    ``{"dev": ..., "test": ...}``. Entries are shuffled with ``cfg.seed`` and dealt alternately, so each
    half gets every other entry; adverbs, prepositions and names are shared (they carry no number)."""
    halves: dict[str, dict] = {"dev": {}, "test": {}}
    for pool in NUMBER_POOLS:
        entries = [list(e) for e in getattr(cfg, pool)]
        random.Random(f"agreelens-lexicon/{cfg.seed}/{pool}").shuffle(entries)
        halves["dev"][pool], halves["test"][pool] = entries[0::2], entries[1::2]
    return {name: cfg.model_copy(update=pools) for name, pools in halves.items()}


def generate(cfg: StimuliConfig, vocab: Vocab | None = None,
             counts: dict[str, int] | None = None) -> tuple[list[dict], dict]:
    """Stimulus records (minimal pairs, BLiMP fields included) and a report.

    The report holds ``pool_sizes`` (after any restriction), ``counts`` per construction and
    condition, ``shortfall`` (conditions with fewer possible sentences than ``n_per_condition``; all
    of them are produced), and, given a vocabulary, ``oov`` (pool words it lacks, per pool, plus
    ``function_words`` of the templates) and ``dropped`` (pool entries left out with
    ``restrict_to_vocab``).
    """
    pools: dict[str, list] = {p: [list(e) if isinstance(e, list) else e for e in getattr(cfg, p)] for p in POOLS}
    literals = _literals(cfg.constructions)
    report: dict[str, Any] = {"seed": cfg.seed, "n_per_condition": cfg.n_per_condition, "oov": None}
    if vocab is not None:
        oov = {p: [w for e in pools[p] for w in _forms(e) if w not in vocab] for p in POOLS}
        oov["function_words"] = [w for w in literals if w not in vocab]
        report["oov"] = oov
        if cfg.restrict_to_vocab:
            if oov["function_words"]:
                raise ValueError(
                    f"the vocabulary lacks the template word(s) {oov['function_words']} needed by "
                    f"constructions {cfg.constructions}; no stimuli can be built with restrict_to_vocab"
                )
            dropped = {p: [e for e in pools[p] if any(w not in vocab for w in _forms(e))] for p in POOLS}
            pools = {p: [e for e in pools[p] if all(w in vocab for w in _forms(e))] for p in POOLS}
            report["dropped"] = dropped
    if counts is not None and cfg.min_count > 0:
        rare = {p: [e for e in pools[p] if any(counts.get(w, 0) < cfg.min_count for w in _forms(e))]
                for p in NUMBER_POOLS}
        pools.update({p: [e for e in pools[p] if e not in rare[p]] for p in NUMBER_POOLS})
        report["rare"] = {p: [f"{w}={counts.get(w, 0)}" for e in rare[p] for w in _forms(e)] for p in NUMBER_POOLS}
    report["pool_sizes"] = {p: len(pools[p]) for p in POOLS}

    need = _required_sizes(cfg.constructions)
    short = [f"{p} has {len(pools[p])} usable entries, needs at least {k}" for p, k in need.items() if len(pools[p]) < k]
    if short:
        note = " after leaving out words missing from the vocabulary" if vocab is not None and cfg.restrict_to_vocab else ""
        note += f" or seen fewer than {cfg.min_count} times" if counts is not None and cfg.min_count else ""
        raise ValueError(f"stimuli pools too small{note}: " + "; ".join(short) + f" (constructions {cfg.constructions})")

    records: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    shortfall: list[dict] = []
    for construction in cfg.constructions:
        sampler = _Sampler(construction, pools)
        counts[construction] = {}
        idx = 0
        for condition in conditions(construction):
            rng = random.Random(f"agreelens-stimuli/{cfg.seed}/{construction}/{condition}")
            drawn = sampler.draw(cfg.n_per_condition, rng)
            for choice, obj_form in drawn:
                records.append(_record(construction, condition, idx, choice, obj_form, pools))
                idx += 1
            counts[construction][condition] = len(drawn)
            if len(drawn) < cfg.n_per_condition:
                shortfall.append(
                    {"construction": construction, "condition": condition,
                     "requested": cfg.n_per_condition, "produced": len(drawn)}
                )
    report["counts"] = counts
    report["shortfall"] = shortfall
    report["n_records"] = len(records)
    return records, report


_JSONL_FIELDS = (
    "sentence_good", "sentence_bad", "one_prefix_prefix", "one_prefix_word_good",
    "one_prefix_word_bad", "condition", "UID", "pairID", "construction",
)
_INFO_FIELDS = ("construction", "condition", "subject_number", "attractor_number", "id")


def write(records: list[dict], out_dir: str | Path) -> list[Path]:
    """Write ``<construction>.{text,gold,info,jsonl}`` for each construction, atomically.

    ``.text``: the good sentence; ``.gold``: 0-based token position of the verb, correct form, wrong
    form (tab-separated); ``.info``: JSON lines of construction, condition, subject_number,
    attractor_number, id; ``.jsonl``: BLiMP-style minimal pairs. The files are written to a temporary
    folder that then replaces ``out_dir`` whole, so a crash never leaves half of them.
    """
    if not records:
        raise ValueError("no stimuli records to write")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    by_construction: dict[str, list[dict]] = {}
    for r in records:
        by_construction.setdefault(r["construction"], []).append(r)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    old = None
    try:
        names = []
        for construction, recs in by_construction.items():
            text, gold, info, jsonl = [], [], [], []
            for r in recs:
                pos = r.get("verb_position")
                if pos is None:
                    pos = len(tokenize(r["one_prefix_prefix"]))
                text.append(r["sentence_good"])
                gold.append(f"{pos}\t{r['one_prefix_word_good']}\t{r['one_prefix_word_bad']}")
                info.append(json.dumps({k: r.get(k) for k in _INFO_FIELDS}))
                jsonl.append(json.dumps({k: r[k] for k in _JSONL_FIELDS}))
            for ext, lines in (("text", text), ("gold", gold), ("info", info), ("jsonl", jsonl)):
                name = f"{construction}.{ext}"
                (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
                names.append(name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "d")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old / "d", out_dir)  # put the previous stimuli back
                raise
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return [out_dir / n for n in names]
