"""Syntax-aware augmentation: training sentences in which a modifier with a noun of the other number stands
between subject and verb.

The learner corpus almost never separates a subject from its verb ("the boy likes"), so agreeing with the
nearest noun costs a language model nothing. Two stages fix the data, not the model:

``parse`` (``agreelens parse``)
    spaCy's ``en_core_web_sm`` parses the training split once (our tokens, as the models read them) and
    keeps, per sentence, its *sites* (a common-noun subject with no post-modifier, its finite verb agreeing
    with it, as :func:`agreelens.natural.agreement_sites` finds them in the benchmark) and its *modifiers*
    (the contiguous subtree of a prepositional phrase, participle or relative clause right after a noun,
    2-8 tokens, whose own nouns share one number): ``<parsed>/train_large.jsonl``.
``augment_syntax`` (``agreelens augment-syntax``)
    for a seeded sample of sites, a modifier from another sentence is inserted right after the subject
    ("the boy likes ..." -> "the boy *near the cars* likes ..."); the verb keeps its form. The modifier's
    nouns have the other number with probability ``other_number``; a share ``stack`` of the insertions are
    two prepositional phrases of that number in a row ("the boy *near the cars of the farmers* likes ...").
    A clause modifier ("who watch the games") keeps its own verb, so it only goes after a subject of its
    original head's number. Writes
    ``<out>/pairs.tsv`` (source<TAB>synthetic) and each model's training text ``<out>/train_<model>.txt``:
    the BERT-augmented text plus the synthetic sentences of its own sources.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from agreelens.natural import NOUN_NUMBER, agreement_sites, load_parser, nouns_between

MOD_DEPS = ("prep", "acl", "relcl")
CLAUSE_DEPS = ("acl", "relcl")
_NUM = {"singular": "S", "plural": "P"}
INDEFINITE = ("one", "body", "thing")
FINITE_TAGS = ("VBZ", "VBP", "VBD", "MD")
_OTHER = {"S": "P", "P": "S"}


class SyntaxConfig(BaseModel):
    """``syntax:`` in params.yaml."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    parsed: str = "parsed"  # the parse stage's folder
    out: str = "syntax"  # pairs.tsv, train_<model>.txt
    max_sentences: int = Field(30000, ge=0)  # synthetic sentences (0 = one per site found)
    other_number: float = Field(1.0, ge=0, le=1)  # share of insertions whose nouns have the other number
    min_len: int = Field(2, ge=1)  # modifier length in tokens
    max_len: int = Field(8, ge=1)
    # share of insertions that stack two prepositional modifiers of the same number ("the boy near the cars of
    # the farmers likes"): two or more attractors, as in the long noun phrases of written text
    stack: float = Field(0.5, ge=0, le=1)
    seed: int = 1
    batch_size: int = Field(256, ge=1)  # sentences per parser batch
    processes: int = Field(0, ge=0)  # parser processes (0 = one per core); the parse is the same for any number


def _cased(tokens: list[str]) -> list[str]:
    """Our lower-cased tokens with the casing the parser expects most: sentence start and "I"."""
    out = ["I" if t == "i" else t for t in tokens]
    if out:
        out[0] = out[0][:1].upper() + out[0][1:]
    return out


def sentence_structure(doc, min_len: int = 2, max_len: int = 8) -> dict:
    """Sites and modifiers of one parsed sentence (token positions; see the module docstring)."""
    sites = []
    for subj, verb, _, _, number in agreement_sites(doc[:]):
        if not subj.text.isalpha() or subj.text.endswith(INDEFINITE):
            continue  # someone, everything, nobody: pronouns the tagger calls nouns
        if subj.right_edge.i == subj.i and not nouns_between(doc, subj.i, verb.i):
            sites.append([subj.i, verb.i, _NUM[number]])
    mods = []
    for head in doc:
        if head.tag_ not in NOUN_NUMBER:
            continue
        for c in head.children:
            lo, hi = c.left_edge.i, c.right_edge.i + 1
            if c.dep_ not in MOD_DEPS or lo != head.i + 1 or not min_len <= hi - lo <= max_len:
                continue
            span = doc[lo:hi]
            if any(t.is_punct or not t.text[:1].isalnum() for t in span):
                continue
            if c.dep_ == "prep" and any(t.tag_ in FINITE_TAGS for t in span):
                continue  # a phrase with a finite verb of its own is a misparsed clause
            numbers = {NOUN_NUMBER[t.tag_] for t in nouns_between(doc, lo - 1, hi)}
            if len(numbers) != 1:
                continue
            mods.append([lo, hi, _NUM[numbers.pop()], _NUM[NOUN_NUMBER[head.tag_]], c.dep_])
    return {"sites": sites, "mods": mods}


_NLP = None  # a parse worker's parser, loaded once per process


def _structures(job: tuple[list[str], int, int, int]) -> list[dict]:
    """Sites and modifiers of a chunk of training lines (a parse worker's task; see :func:`run_parse`)."""
    global _NLP
    from spacy.tokens import Doc

    lines, batch_size, min_len, max_len = job
    if _NLP is None:
        _NLP = load_parser()
    docs = (Doc(_NLP.vocab, words=_cased(line.split())) for line in lines)
    return [sentence_structure(doc, min_len, max_len) for doc in _NLP.pipe(docs, batch_size=batch_size)]


def run_parse(params, progress: bool = True) -> dict:
    """Stage ``parse``: ``<parsed>/train_large.jsonl``, one line per training sentence with a site or a
    modifier: ``{"k": line index, "sites": [[subj, verb, S|P]], "mods": [[start, end, S|P, head S|P, dep]]}``.
    ``syntax.processes`` workers parse chunks of 16 parser batches each, so every sentence meets the same
    batch as in one process and the file is the same for any number of them."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from agreelens.corpus import read_split

    cfg = params.syntax
    lines = read_split(Path(params.prepare.out) / "train_large.txt")
    out = Path(cfg.parsed) / "train_large.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    t0, n_sites, n_mods = time.time(), 0, 0
    size = 16 * cfg.batch_size
    jobs = [(lines[i:i + size], cfg.batch_size, cfg.min_len, cfg.max_len) for i in range(0, len(lines), size)]
    processes = max(1, min(cfg.processes or os.cpu_count() or 1, len(jobs)))
    pool = ProcessPoolExecutor(processes) if processes > 1 else None
    bar = tqdm(total=len(lines), unit="sent", desc=f"parse training text ({processes} processes)",
               disable=not progress, mininterval=2)
    k = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for chunk in (pool.map(_structures, jobs) if pool else map(_structures, jobs)):
                for st in chunk:
                    if st["sites"] or st["mods"]:
                        f.write(json.dumps({"k": k, **st}) + "\n")
                        n_sites += len(st["sites"])
                        n_mods += len(st["mods"])
                    k += 1
                bar.update(len(chunk))
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    tmp.replace(out)
    return {"sentences": len(lines), "sites": n_sites, "modifiers": n_mods, "seconds": round(time.time() - t0, 1),
            "processes": processes}


def synthesize(lines: list[str], parsed: list[dict], cfg: SyntaxConfig) -> tuple[list[tuple[int, str]], dict]:
    """``[(source line index, synthetic sentence)]`` and counts, from the parse of ``lines``."""
    rng = random.Random(f"agreelens-syntax/{cfg.seed}")
    bank: dict[tuple, list[tuple[str, ...]]] = {}
    seen = set()
    for rec in parsed:
        toks = lines[rec["k"]].split()
        for lo, hi, number, head, dep in rec["mods"]:
            words = tuple(toks[lo:hi])
            key = (number, head if dep in CLAUSE_DEPS else "*")
            if (key, words) not in seen:
                seen.add((key, words))
                bank.setdefault(key, []).append(words)
    sites = [(rec["k"], s, v, n) for rec in parsed for s, v, n in rec["sites"]]
    rng.shuffle(sites)
    used, out, counts, n_stacked = set(), [], Counter(), 0
    for k, s, v, number in sites:
        if cfg.max_sentences and len(out) >= cfg.max_sentences:
            break
        if k in used:
            continue  # one synthetic sentence per source
        want = _OTHER[number] if rng.random() < cfg.other_number else number
        pool = bank.get((want, "*"), []) + bank.get((want, number), [])
        if not pool:
            continue
        mod = rng.choice(pool)
        stacked = cfg.stack > 0 and rng.random() < cfg.stack
        if stacked:  # two phrases, both prepositional (a clause's own verb would need its head's number)
            preps = bank.get((want, "*"), [])
            if len(preps) < 2:
                continue
            first, second = rng.sample(range(len(preps)), 2)
            mod = preps[first] + preps[second]
        toks = lines[k].split()
        out.append((k, " ".join(toks[: s + 1] + list(mod) + toks[s + 1:])))
        used.add(k)
        counts[f"{number}{want}"] += 1
        n_stacked += stacked
    stats = {"sites": len(sites), "modifiers": {f"{n}/{h}": len(v) for (n, h), v in sorted(bank.items())},
             "synthetic": len(out), "subject_modifier_numbers": dict(sorted(counts.items()))}
    if cfg.stack:
        stats["stacked"] = n_stacked
    return out, stats


def run_augment_syntax(params, metrics_path: str | Path | None = "metrics/syntax.json") -> dict:
    """Stage ``augment_syntax``: ``<out>/pairs.tsv`` and ``<out>/train_<model>.txt`` (see the module
    docstring); with ``enabled: false`` each model's text is the BERT-augmented text alone. The counts go
    to ``metrics_path`` (None: not written)."""
    from agreelens.corpus import read_split

    cfg = params.syntax
    prepared, out = Path(params.prepare.out), Path(cfg.out)
    lines = read_split(prepared / "train_large.txt")
    pairs: list[tuple[str, str]] = []
    stats: dict = {"enabled": cfg.enabled}
    if cfg.enabled:
        path = Path(cfg.parsed) / "train_large.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no parse of the training text; run `agreelens parse` (or `dvc repro`)")
        parsed = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
        made, st = synthesize(lines, parsed, cfg)
        pairs = [(lines[k], text) for k, text in made]
        stats.update(st)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    stats["models"] = {}
    for name in params.model_names:
        mine = set(read_split(prepared / f"train_{name}.txt"))
        base = read_split(Path(params.augment.out) / f"train_{name}.txt")
        synthetic = [t for s, t in pairs if s in mine]
        (out / f"train_{name}.txt").write_text("".join(f"{x}\n" for x in base + synthetic), encoding="utf-8")
        stats["models"][name] = {"sentences": len(base) + len(synthetic), "synthetic": len(synthetic),
                                 "tokens": sum(len(x.split()) for x in base + synthetic),
                                 "synthetic_tokens": sum(len(x.split()) for x in synthetic)}
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(json.dumps(stats, indent=2) + "\n")
    return stats
