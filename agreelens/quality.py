"""Data-quality gates (Great Expectations 1.x), run as pipeline steps before anything trains.

Each suite turns its input into pandas tables, validated in an ephemeral (in-memory) GX context:
``raw``: *files* (corpus files as :mod:`agreelens.corpus` reads them, ``<prepare.out>/vocab.txt``, the largest
``train_<size>.txt``; read as bytes, so a bad file is reported, never raised, and fails exactly one check,
in ``corpus.read_text``'s order), *sentences* (every sentence of the readable corpus files, split and
tokenized as ``prepare`` does; ``data.max_sentences`` is ignored), *lexicon* (the NA-task pool words).
``augmented``: *pairs*, one row per line of ``<augment.out>/pairs.tsv`` (``source<TAB>synthetic``).
``syntax``: *pairs*, one row per line of ``<syntax.out>/pairs.tsv``: each synthetic sentence must be its
source with one contiguous run of ``syntax.min_len`` .. ``max_len`` tokens inserted (nothing else changed).
:func:`validate` writes ``<quality.out>/<suite>.json`` and ``.md`` and raises :class:`QualityGateError`
naming the failed expectations and the report. Thresholds: ``quality`` in params.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from agreelens.config import Params
from agreelens.corpus import _WIKI_AT, _WIKI_UNK, SPLITS
from agreelens.stimuli import POOLS
from agreelens.text import split_sentences, tokenize

SUITES = ("raw", "augmented", "syntax")
SPECIAL_PIECES = r"(?i)\[(?:mask|unk|cls|sep|pad)\]|##"  # BERT pieces that must not survive augmentation
_INDEX = ["file", "line", "text"]  # every table has these: where an offending row comes from


class QualityGateError(RuntimeError):
    """A quality gate failed; the message names the failed expectations and the markdown report."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


@dataclass
class Check:
    name: str  # our name, unique per suite (a GX expectation type can repeat)
    table: str
    gx: str  # class in gx.expectations
    kwargs: dict
    expected: str  # what passing means, in words (for the report)
    examples: Callable[[pd.DataFrame, int], list[dict]] | None = None  # offending rows for aggregates


# ----------------------------------------------------------------------------------------- inputs
def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _check_file(path: Path, root: Path, hint: str) -> tuple[dict, str | None]:
    """A *files* row and the text if readable; a check after the first failing one is None (not checked)."""
    row = {"file": _rel(path, root), "line": 0, "text": f"missing; {hint}", "exists": path.is_file(),
           "nonempty": None, "no_nul": None, "utf8": None}
    if not row["exists"]:
        return row, None
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    row.update(nonempty=bool(raw.strip()), text="empty; remove it or add text")
    if row["nonempty"]:
        row.update(no_nul=nul < 0, text=f"binary (NUL byte at offset {nul}); corpora must be plain UTF-8 text")
    if not row["nonempty"] or nul >= 0:
        return row, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        row.update(utf8=False, text=f"not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); convert it, "
                                    "e.g. `iconv -f latin1 -t utf-8`")
        return row, None
    row.update(utf8=True, text="ok")
    return row, text


def _corpus_files(data: Path, corpora: list[str]) -> list[tuple[str, Path]]:
    """The files ``corpus.READERS`` read; a missing or empty folder gives one (missing) pattern path."""
    out: list[tuple[str, Path]] = []
    for name in corpora:
        if name == "wikitext2":
            out += [(name, data / "wikitext2" / f"{s}.txt") for s in SPLITS]
            continue
        folders = [data / "tatoeba"] if name == "tatoeba" else [data / "onestopenglish" / lv for lv in ("ele", "int", "adv")]
        for folder in folders:
            files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
            out += [(name, f) for f in files] or [(name, folder / "*.txt")]
    return out


def _raw_tables(params: Params, root: Path) -> dict[str, pd.DataFrame]:
    data = root / params.data.root
    prepared = root / params.prepare.out
    largest = max(params.prepare.sizes, key=params.prepare.sizes.get)
    files, sents = [], {"file": [], "line": [], "text": [], "tokens": [], "n_tokens": []}
    for corpus, path in _corpus_files(data, params.data.corpora):
        row, text = _check_file(path, root, "restore the data with `agreelens data`")
        files.append(row)
        for i, line in enumerate((text or "").splitlines(), 1):
            if corpus == "wikitext2":
                if not line.strip() or line.strip().startswith("="):
                    continue
                line = _WIKI_AT.sub(r"\1", line.replace("<unk>", _WIKI_UNK))
            for sent in split_sentences(line):
                toks = tokenize(sent)
                if toks:
                    for key, value in zip(sents, (row["file"], i, sent, " ".join(toks), len(toks))):
                        sents[key].append(value)
    vocab_row, vocab_text = _check_file(prepared / "vocab.txt", root, "run `agreelens prepare`")
    train_row, _ = _check_file(prepared / f"train_{largest}.txt", root, "run `agreelens prepare`")
    files += [vocab_row, train_row]
    vocab = set((vocab_text or "").splitlines())
    lexicon = [{"file": vocab_row["file"], "line": 0, "text": w, "pool": pool, "in_vocab": w in vocab}
               for pool in POOLS for entry in getattr(params.stimuli, pool)
               for w in (entry if isinstance(entry, list) else [entry])]
    return {"files": pd.DataFrame(files), "sentences": pd.DataFrame(sents), "lexicon": pd.DataFrame(lexicon)}


def _pairs_table(params: Params, root: Path) -> pd.DataFrame:
    out = getattr(getattr(params, "augment", None), "out", "augmented")  # AugmentParams.out where present
    path = root / (params.quality.pairs or f"{out}/pairs.tsv")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: augmented pairs missing; run the augment stage first "
                                "(it writes one `source<TAB>synthetic` line per synthetic sentence)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 (byte {err.start}); rerun the augment stage") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        fields = line.split("\t")
        row = {"file": _rel(path, root), "line": i, "text": line, "n_fields": len(fields) if line.strip() else None,
               "source": None, "synthetic": None, "n_src": None, "n_syn": None, "rate": None}
        if len(fields) == 2 or not line.strip():
            src, syn = (fields[0].split(), fields[1].split()) if len(fields) == 2 else ([], [])
            row.update(source=" ".join(src), synthetic=" ".join(syn), n_src=len(src), n_syn=len(syn))
            if src and len(src) == len(syn):
                row["rate"] = sum(a != b for a, b in zip(src, syn)) / len(src)
        rows.append(row)
    df = pd.DataFrame(rows, columns=["file", "line", "text", "n_fields", "source", "synthetic", "n_src", "n_syn", "rate"])
    return df.astype({c: "float64" for c in ("n_fields", "n_src", "n_syn", "rate")})


def inserted_length(src: list[str], syn: list[str]) -> int | None:
    """Tokens inserted when ``syn`` is ``src`` with one contiguous run added, else None."""
    if len(syn) <= len(src):
        return None
    i = 0
    while i < len(src) and src[i] == syn[i]:
        i += 1
    n = len(syn) - len(src)
    return n if syn[i + n:] == src[i:] else None


def _syntax_table(params: Params, root: Path) -> pd.DataFrame:
    path = root / params.syntax.out / "pairs.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: syntax pairs missing; run `agreelens augment-syntax` first")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        src, syn = (fields[0].split(), fields[1].split()) if len(fields) == 2 else ([], [])
        rows.append({"file": _rel(path, root), "line": i, "text": line, "n_fields": float(len(fields)),
                     "synthetic": " ".join(syn), "inserted": inserted_length(src, syn) if src else None})
    df = pd.DataFrame(rows, columns=["file", "line", "text", "n_fields", "synthetic", "inserted"])
    return df.astype({"n_fields": "float64", "inserted": "float64"})


def _syntax_checks(params: Params) -> list[Check]:
    sx = params.syntax
    return [
        Check("pairs_well_formed", "pairs", "ExpectColumnValuesToBeInSet", {"column": "n_fields", "value_set": [2]},
              "every line is `source<TAB>synthetic` (2 fields)"),
        Check("no_special_pieces", "pairs", "ExpectColumnValuesToNotMatchRegex", {"column": "synthetic", "regex": SPECIAL_PIECES},
              "no [MASK], [UNK], [CLS], [SEP], [PAD] or ## pieces in the synthetic text"),
        Check("one_insertion", "pairs", "ExpectColumnValuesToNotBeNull", {"column": "inserted"},
              "each synthetic sentence is its source with one contiguous run inserted (the verb keeps its form)"),
        Check("insertion_length", "pairs", "ExpectColumnValuesToBeBetween",
              {"column": "inserted", "min_value": sx.min_len, "max_value": sx.max_len * (2 if sx.stack else 1)},
              f"{sx.min_len} to {sx.max_len * (2 if sx.stack else 1)} tokens inserted"),
    ]


# ----------------------------------------------------------------------------------------- checks
def _duplicates(df: pd.DataFrame, k: int) -> list[dict]:
    dup = df[df.duplicated("tokens", keep=False)]
    counts = dup["tokens"].value_counts().head(k)
    first = dup.drop_duplicates("tokens").set_index("tokens")
    return [{"file": first.at[t, "file"], "line": int(first.at[t, "line"]), "text": first.at[t, "text"],
             "value": f"{c} copies"} for t, c in counts.items()]


def _raw_checks(params: Params) -> list[Check]:
    q = params.quality
    allowed, line = re.compile(f"[{q.allowed_chars}]"), rf"\A[{q.allowed_chars}]+\Z"

    def charset(df: pd.DataFrame, k: int) -> list[dict]:
        bad = df[~df["text"].str.contains(line)].head(k)
        return [{"file": r.file, "line": int(r.line), "text": r.text,
                 "value": "".join(sorted({c for c in r.text if not allowed.match(c)}))} for r in bad.itertuples()]

    files = [("file_exists", "exists", "every corpus / prepared file exists"),
             ("file_not_empty", "nonempty", "no file is empty (or whitespace only)"),
             ("file_no_nul", "no_nul", "no file has NUL bytes (binary)"),
             ("file_utf8", "utf8", "every file decodes as UTF-8")]
    return [Check(n, "files", "ExpectColumnValuesToBeInSet", {"column": c, "value_set": [True]}, x) for n, c, x in files] + [
        Check("sentence_length", "sentences", "ExpectColumnValuesToBeBetween",
              {"column": "n_tokens", "min_value": q.min_sentence_tokens, "max_value": q.max_sentence_tokens,
               "mostly": q.length_mostly},
              f"at least {q.length_mostly:.2%} of sentences have {q.min_sentence_tokens}..{q.max_sentence_tokens} tokens"),
        Check("duplicate_rate", "sentences", "ExpectColumnProportionOfUniqueValuesToBeBetween",
              {"column": "tokens", "min_value": 1 - q.max_duplicate_rate},
              f"distinct / all tokenized sentences >= {1 - q.max_duplicate_rate:.4g} "
              f"(duplicate rate <= {q.max_duplicate_rate:.4g})", _duplicates),
        Check("charset", "sentences", "ExpectColumnValuesToMatchRegex",
              {"column": "text", "regex": line, "mostly": q.charset_mostly},
              f"at least {q.charset_mostly:.2%} of sentences use only [{q.allowed_chars}]", charset),
        Check("total_tokens", "sentences", "ExpectColumnSumToBeBetween", {"column": "n_tokens", "min_value": q.min_total_tokens},
              f"the corpora hold >= {q.min_total_tokens:,} tokens"),
        Check("lexicon_coverage", "lexicon", "ExpectColumnValuesToBeInSet",
              {"column": "in_vocab", "value_set": [True], "mostly": q.min_lexicon_coverage},
              f"at least {q.min_lexicon_coverage:.2%} of the NA-task pool words are in vocab.txt"),
    ]


def _augmented_checks(params: Params, df: pd.DataFrame) -> list[Check]:
    q = params.quality
    mean = float(df["n_src"].mean()) if df["n_src"].notna().any() else 0.0

    def far(d: pd.DataFrame, k: int) -> list[dict]:
        top = (d["n_syn"] - d["n_src"]).abs().nlargest(k).index
        return [{"file": r.file, "line": int(r.line), "text": r.text, "value": f"{r.n_src:.0f} -> {r.n_syn:.0f} tokens"}
                for r in d.loc[top].itertuples()]

    checks = [
        Check("pairs_present", "pairs", "ExpectTableRowCountToBeBetween", {"min_value": 1}, "the pairs file has at least one line"),
        Check("pairs_well_formed", "pairs", "ExpectColumnValuesToBeInSet", {"column": "n_fields", "value_set": [2]},
              "every non-blank line is `source<TAB>synthetic` (2 fields)"),
        Check("no_empty_lines", "pairs", "ExpectColumnValueLengthsToBeBetween", {"column": "synthetic", "min_value": 1},
              "no blank line, no empty synthetic text"),
        Check("no_special_pieces", "pairs", "ExpectColumnValuesToNotMatchRegex", {"column": "synthetic", "regex": SPECIAL_PIECES},
              "no [MASK], [UNK], [CLS], [SEP], [PAD] or ## pieces in the synthetic text"),
        Check("replacement_rate", "pairs", "ExpectColumnValuesToBeBetween",
              {"column": "rate", "min_value": q.min_replacement_rate, "max_value": q.max_replacement_rate, "strict_min": True},
              f"share of token positions changed per pair in ({q.min_replacement_rate:g}, {q.max_replacement_rate:g}]"),
        Check("same_length", "pairs", "ExpectColumnPairValuesToBeEqual",
              {"column_A": "n_src", "column_B": "n_syn", "mostly": q.length_equal_mostly},
              f"at least {q.length_equal_mostly:.2%} of synthetic sentences have the source's token count"),
        Check("length_mean", "pairs", "ExpectColumnMeanToBeBetween",
              {"column": "n_syn", "min_value": mean * (1 - q.length_mean_tolerance), "max_value": mean * (1 + q.length_mean_tolerance)},
              f"mean synthetic length within {q.length_mean_tolerance:.0%} of the source mean ({mean:.2f} tokens)", far),
    ]
    if not params.augment.enabled:  # `augment.enabled: false` writes no pairs: what is written is still checked
        checks = [c for c in checks if c.name not in ("pairs_present", "length_mean")]
    return checks


# ----------------------------------------------------------------------------------------- run
def _plain(v):
    """JSON-safe copy of a GX value (numpy scalars, tuples, nested)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def _entry(check: Check, r, df: pd.DataFrame, k: int) -> dict:
    cfg, res = r.expectation_config, r.result or {}
    kw = {key: _plain(v) for key, v in cfg.kwargs.items() if key != "batch_id"}
    column = kw.get("column") or ("/".join([kw["column_A"], kw["column_B"]]) if "column_A" in kw else None)
    out = {"name": check.name, "type": cfg.type, "table": check.table, "column": column, "success": bool(r.success),
           "expected": check.expected, "kwargs": kw}
    if "unexpected_count" in res:  # map expectation: observed = share of the checked (non-null) rows that pass
        pct = res.get("unexpected_percent")
        out.update(observed=None if pct is None else round(1 - pct / 100, 6), unexpected_count=int(res["unexpected_count"]),
                   element_count=int(res.get("element_count", 0)) - int(res.get("missing_count") or 0))
    else:
        out["observed"] = _plain(res.get("observed_value"))
    info = r.exception_info or {}
    if info.get("raised_exception"):
        out["exception"] = str(info.get("exception_message"))
    examples = []
    if not r.success and k:
        if check.examples is not None and len(df):
            examples = check.examples(df, k)
        else:
            for d in res.get("partial_unexpected_index_list") or []:
                ex = {"file": d.get("file"), "line": int(d["line"]) if d.get("line") else None, "text": d.get("text")}
                if column in d and column != "text":
                    ex["value"] = d[column]
                examples.append(ex)
    out["examples"] = _plain(examples[:k])
    return out


def _run_gx(suite: str, tables: dict[str, pd.DataFrame], checks: list[Check], k: int) -> list[dict]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_pandas(f"agreelens_{suite}")
    fmt = {"result_format": "SUMMARY", "partial_unexpected_count": max(k, 1), "unexpected_index_column_names": _INDEX}
    by_name = {}
    for table, df in tables.items():
        mine = [c for c in checks if c.table == table]
        expectations = [getattr(gx.expectations, c.gx)(**c.kwargs, meta={"name": c.name}) for c in mine]
        gx_suite = ctx.suites.add(gx.ExpectationSuite(name=f"{suite}.{table}", expectations=expectations))
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{suite}.{table}", data=batch, suite=gx_suite))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = vd.run(batch_parameters={"dataframe": df}, result_format=fmt)
        for r in result.results:
            by_name[r.expectation_config.meta["name"]] = r
    return [_entry(c, by_name[c.name], tables[c.table], k) for c in checks]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _markdown(s: dict, seconds: float) -> str:
    lines = [f"# Quality gate `{s['suite']}`: {'PASSED' if s['success'] else 'FAILED'}", "",
             f"{s['statistics']['expectations']} expectations, {s['statistics']['failed']} failed; rows: "
             + ", ".join(f"{t} {n:,}" for t, n in s["tables"].items()) + f"; {seconds:.1f} s.", "",
             "| expectation | table.column | result | observed | failing rows |", "|---|---|---|---:|---:|"]
    for e in s["expectations"]:
        col = f"{e['table']}.{e['column']}" if e["column"] else e["table"]
        bad = _fmt(e["unexpected_count"]) if "unexpected_count" in e else ""
        lines.append(f"| {e['name']} | {col} | {'pass' if e['success'] else '**FAIL**'} | {_fmt(e['observed'])} | {bad} |")
    for e in (e for e in s["expectations"] if not e["success"]):
        lines += ["", f"## {e['name']} failed (`{e['type']}`)", "", f"- expected: {e['expected']}",
                  f"- observed: {_fmt(e['observed'])}"
                  + (f" ({e['unexpected_count']:,} of {e['element_count']:,} checked rows fail)" if "unexpected_count" in e else "")]
        if e.get("exception"):
            lines.append(f"- error: {e['exception']}")
        for ex in e["examples"]:
            where = f"{ex['file']}:{ex['line']}" if ex.get("line") else ex["file"]
            value = f" ({e['column']}: {json.dumps(ex['value'], ensure_ascii=False)})" if ex.get("value") is not None else ""
            lines.append(f"- `{where}`{value}: {json.dumps(ex.get('text'), ensure_ascii=False)[:300]}")
    return "\n".join(lines) + "\n"


def validate(params: Params, suite: str, root: str | Path = ".") -> dict:
    """Run one suite (``raw``, ``augmented`` or ``syntax``); write ``<quality.out>/<suite>.json`` and ``.md`` under
    ``root``; return the json summary, or raise :class:`QualityGateError` if an expectation failed."""
    if suite not in SUITES:
        raise ValueError(f"unknown quality suite '{suite}' (known: {', '.join(SUITES)})")
    root, t0, k = Path(root), time.perf_counter(), params.quality.max_examples
    if suite == "raw":
        tables, checks = _raw_tables(params, root), _raw_checks(params)
    elif suite == "syntax":
        tables = {"pairs": _syntax_table(params, root)}
        checks = _syntax_checks(params)
    else:
        tables = {"pairs": _pairs_table(params, root)}
        checks = _augmented_checks(params, tables["pairs"])
    entries = _run_gx(suite, tables, checks, k)
    out = root / params.quality.out
    report = out / f"{suite}.md"
    failed = [e["name"] for e in entries if not e["success"]]
    summary = {"suite": suite, "success": not failed, "failed": failed,
               "statistics": {"expectations": len(entries), "failed": len(failed)},
               "tables": {t: len(df) for t, df in tables.items()},
               "report": _rel(report, root), "expectations": entries}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{suite}.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - t0  # in the .md only: the .json is a DVC dep and must not change on a rerun
    report.write_text(_markdown(summary, seconds), encoding="utf-8")
    if failed:
        raise QualityGateError(f"quality gate '{suite}' failed: {', '.join(failed)}; see {report}", summary)
    return summary
