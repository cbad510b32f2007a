"""``agreelens`` command line: one command per pipeline stage (the entry points ``dvc.yaml`` calls)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from agreelens.config import PROFILE_ENV, ParamsError, load_params
from agreelens.tracking import setup_env

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="agreelens: how an LSTM LM trained on learner English tracks subject-verb agreement.",
)
console = Console()
err_console = Console(stderr=True)

ParamsOpt = typer.Option("params.yaml", "--params", help="settings file (the one source of truth)")
ProfileOpt = typer.Option(None, "--profile", help="profile of params.yaml to apply to this command alone (default: "
                                                  "its `profile` key, the one that `dvc repro` uses)")
ModelOpt = typer.Option(..., "--model", "-m", help="model name under models/ or a model directory")
StimuliOpt = typer.Option("stimuli", "--stimuli", help="folder of NA stimuli (.jsonl)")


def _params(path: str, profile: Optional[str]):
    """Settings of ``path``: ``--profile``, else the file's ``profile`` key (never the environment, so that a
    command run by ``dvc repro`` computes what params.yaml, which DVC tracks, says)."""
    setup_env()
    env = os.environ.get(PROFILE_ENV)
    if env and not profile:
        err_console.print(f"[yellow]note:[/yellow] {PROFILE_ENV}={env} is ignored: agreelens commands use "
                          f"the `profile` of {path} (or --profile)")
    try:
        return load_params(path, profile, env=False)
    except ParamsError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None


def _fail(err: Exception) -> None:
    err_console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(1)


def _call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a missing file or a bad value ends the command with its message (exit 1)."""
    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)


@app.command()
def data(
    root: str = typer.Option("data", help="where the corpora go (DVC-tracked by data.dvc)"),
    archives: str = typer.Option("corpora", help="folder of the committed compressed corpora"),
) -> None:
    """Stage 0: restore data/ from the compressed corpora in the repository (no remote needed)."""
    from agreelens.data import cache, restore

    try:
        restored = restore(root, archives)
        dvc_file = Path(f"{root}.dvc")
        if restored and dvc_file.is_file():
            cache(dvc_file)
    except (OSError, ValueError, RuntimeError) as err:
        _fail(err)
    console.print(f"restored: {', '.join(restored)}" if restored else f"{root}/ already present; nothing restored")


@app.command()
def prepare(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage 1: sentence split, tokenize, split by document, build the vocabulary, write statistics."""
    from agreelens.corpus import CorpusError, prepare as run_prepare

    p = _params(params, profile)
    try:
        stats = run_prepare(p, progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    except CorpusError as err:
        _fail(err)
    t = Table(title=f"prepared corpus (vocabulary {stats['vocab_size']})")
    for col in ("split", "sentences", "tokens", "types", "OOV rate"):
        t.add_column(col, justify="right")
    rows = {**stats["splits"], **{f"train_{k}": v for k, v in stats["models"].items()}}
    for name, s in rows.items():
        t.add_row(name, f"{s['sentences']:,}", f"{s['tokens']:,}", f"{s['types']:,}", f"{s['oov_rate']:.2%}")
    console.print(t)


@app.command("finetune-mlm")
def finetune_mlm(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage: fine-tune the masked LM (MiniLM encoder + new MLM head) on the training split -> models/mlm."""
    from agreelens.augment import run_finetune

    p = _params(params, profile)
    try:
        stats = run_finetune(p)
    except (OSError, RuntimeError, ValueError) as err:
        _fail(err)
    console.print(f"masked LM {stats['mlm']}: {stats['steps']} steps, loss {stats['loss_first']} -> "
                  f"{stats['loss_last']} ({stats['seconds']} s) -> models/mlm")


@app.command("augment")
def augment_cmd(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage: BERT masked-LM augmentation of the training split -> augmented/ (pairs + training text)."""
    from agreelens.augment import run_augment

    p = _params(params, profile)
    try:
        stats = run_augment(p)
    except (OSError, RuntimeError, ValueError) as err:
        _fail(err)
    t = Table(title=f"augmentation ({'agreement-safe' if stats['agreement_safe'] else 'unsafe'}, "
                    f"{stats.get('sentences_per_s', 0)} sentences/s)")
    for col in ("model", "sentences", "synthetic", "tokens", "synthetic tokens"):
        t.add_column(col, justify="right")
    for name, m in stats["models"].items():
        t.add_row(name, f"{m['sentences']:,}", f"{m['synthetic']:,}", f"{m['tokens']:,}", f"{m['synthetic_tokens']:,}")
    console.print(t)
    console.print({k: stats[k] for k in ("sources", "masked", "filled", "unfilled", "duplicates", "kept") if k in stats})


def _relaunch_ddp(p, nproc: int, args: list[str]) -> None:
    """Run ``agreelens <args>`` as ``nproc`` DDP processes under torchrun; exits with their status."""
    import torch

    if "WORLD_SIZE" in os.environ:
        _fail(ValueError(f"already one of {os.environ['WORLD_SIZE']} processes (WORLD_SIZE is set): "
                         "run without --nproc under torchrun, or unset WORLD_SIZE"))
    if p.train.batch_size % nproc:
        _fail(ValueError(f"train.batch_size {p.train.batch_size} is not divisible by --nproc {nproc}"))
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        _fail(ValueError(f"--nproc {nproc} but this machine has {torch.cuda.device_count()} GPU(s): one process per GPU"))
    rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={nproc}", "-m", "agreelens", *args]).returncode
    raise typer.Exit(rc if rc >= 0 else 128 - rc)  # killed by signal N: 128 + N, as a shell reports it


@app.command()
def train(
    model: str = typer.Option(..., "--model", "-m", help="which model: a key of prepare.sizes (small, large)"),
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    nproc: int = typer.Option(1, min=1, help="data-parallel processes (DDP via torchrun: one per GPU, or gloo "
                                            "on CPUs); train.batch_size must be divisible by it"),
) -> None:
    """Stage 2: train one LSTM LM (resumes from its checkpoint after an interruption)."""
    from agreelens.train import train as run_train

    p = _params(params, profile)
    if nproc > 1:
        _relaunch_ddp(p, nproc, ["train", "--model", model, "--params", params,
                                 *(["--profile", profile] if profile else [])])
    summary = _call(run_train, p, model)
    if "RANK" in os.environ and os.environ["RANK"] != "0":
        return
    console.print(
        f"[green]{model}[/green]: best valid PPL {summary['best_valid_ppl']:.1f} after {summary['epochs']:.2f} epochs, "
        f"{summary['train_seconds'] / 60:.1f} min, {summary['tokens_per_second']:,} tok/s -> models/{model}"
    )


@app.command()
def evaluate(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage 3: test perplexity of every model, learning-curve figure."""
    from agreelens.evaluate import evaluate as run_evaluate

    p = _params(params, profile)
    try:
        run_evaluate(p)
    except FileNotFoundError as err:
        _fail(err)
    print_report(Path("metrics"))


@app.command()
def stimuli(
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    out: str = typer.Option("stimuli", help="output folder (.text/.gold/.info/.jsonl per construction)"),
) -> None:
    """Stage 4: generate the NA-task stimuli (Lakretz et al. 2019) from the pools in params.yaml."""
    from agreelens.na import make_stimuli

    p = _params(params, profile)
    rep = _call(make_stimuli, p, out)
    oov = {k: v for k, v in (rep.get("oov") or {}).items() if v}
    if oov:
        console.print(f"[yellow]out-of-vocabulary pool words (dropped from the pools):[/yellow] {oov}")
    rare = {k: v for k, v in (rep.get("rare") or {}).items() if v}
    if rare:
        console.print(f"[yellow]pool words seen fewer than {p.stimuli.min_count} times in training (dropped):[/yellow] {rare}")
    short = rep.get("shortfall") or {}
    if short:
        console.print(f"[yellow]fewer unique sentences than asked for:[/yellow] {short}")
    console.print(f"{rep['n_records']:,} minimal pairs -> {out}/")


@app.command()
def natural(
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    sample: int = typer.Option(0, help="print this many random items of the built sets instead (for checking by eye)"),
    min_attractors: int = typer.Option(0, help="with --sample: only items with at least this many attractors"),
) -> None:
    """Stage: the natural-text agreement benchmark (dev/test .jsonl with n_attractors) from held-out text."""
    from agreelens import natural as nat

    p = _params(params, profile)
    if sample:
        import random

        items = [json.loads(x) for f in ("dev", "test") for x in _call(Path(p.natural.out, f"{f}.jsonl").read_text).splitlines()]
        items = [it for it in items if it["n_attractors"] >= min_attractors]
        for it in random.Random(p.natural.seed).sample(items, min(sample, len(items))):
            print(f"{it['pairID']}\t{it['subject']}\t{','.join(it['attractors'])}\t{it['one_prefix_prefix']} "
                  f"[{it['one_prefix_word_good']} / {it['one_prefix_word_bad']}]")
        return
    train = sorted(Path(p.prepare.out).glob("train_*.txt"))
    try:
        stats = nat.build(p, train_files=train)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(err)
    for name, st in stats["splits"].items():
        console.print(f"{name}: {st['items']:,} items; by attractors {st['by_attractors']}; by source {st['by_source']}")
    console.print(f"parsed {stats['sentences_parsed']:,} sentences in {stats['parse_seconds']} s -> {p.natural.out}/")


@app.command("profile")
def profile_cmd(name: Optional[str] = typer.Argument(None, help="profile to make the default of params.yaml"),
                params: str = ParamsOpt) -> None:
    """Show the profile params.yaml runs, or make NAME the one that `dvc repro` runs (the `profile` key)."""
    from agreelens.config import ParamsError, set_profile

    if name:
        try:
            set_profile(params, name)
        except ParamsError as err:
            _fail(err)
    console.print(f"profile: {_params(params, None).profile}")


@app.command()
def checkbench(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage: the agreement checker's benchmark (correct held-out sentences, the same with one site swapped)."""
    from agreelens import checkbench as cb

    p = _params(params, profile)
    try:
        counts = cb.build(p)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    for name, c in counts.items():
        console.print(f"{name}: {c['sentences']:,} sentences, {c['errors']:,} swapped sites; by kind "
                      f"{c['errors_by_kind']}; by attractors {c['errors_by_attractors']}")
    console.print(f"-> {p.checkbench.out}/dev.jsonl, {p.checkbench.out}/test.jsonl")


@app.command()
def parse(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage: parse the training split once (spaCy): agreement sites and noun modifiers -> parsed/."""
    from agreelens.syntax import run_parse

    p = _params(params, profile)
    try:
        st = run_parse(p)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(err)
    console.print(f"{st['sentences']:,} sentences parsed in {st['seconds']} s: {st['sites']:,} sites, "
                  f"{st['modifiers']:,} modifiers -> {p.syntax.parsed}/")


@app.command("augment-syntax")
def augment_syntax(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage: insert modifiers with nouns of the other number between subject and verb -> syntax/."""
    from agreelens.syntax import run_augment_syntax

    p = _params(params, profile)
    st = _call(run_augment_syntax, p)
    if not st["enabled"]:
        console.print("syntax.enabled is false: the training text is the augmented text alone")
    else:
        console.print(f"{st['synthetic']:,} synthetic sentences from {st['sites']:,} sites "
                      f"(subject/modifier numbers {st['subject_modifier_numbers']}) -> {p.syntax.out}/")
    for name, m in st["models"].items():
        console.print(f"  {name}: {m['sentences']:,} sentences, {m['synthetic']:,} synthetic, {m['tokens']:,} tokens")


@app.command("evaluate-na")
def evaluate_na(
    model: str = ModelOpt,
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
) -> None:
    """Stage 5: NA accuracy of one model (overall, per construction and condition) and BLiMP."""
    from agreelens.na import evaluate_na as run

    p = _params(params, profile)
    r = _call(run, p, model)
    t = Table(title=f"NA accuracy of {model}: {r['accuracy']:.1%} ({r['n']:,} pairs, {r['oov']} OOV)")
    t.add_column("construction")
    conds = ["S", "P", "SS", "SP", "PS", "PP"]
    for c in conds:
        t.add_column(c, justify="right")
    for cons in r["constructions"]:
        t.add_row(cons, *[f"{r['groups'][f'{cons}/{c}']['accuracy']:.0%}" if f"{cons}/{c}" in r["groups"] else ""
                          for c in conds])
    console.print(t)


@app.command()
def score(
    files: list[Path] = typer.Argument(None, help="BLiMP-style .jsonl files of minimal pairs"),
    model: str = typer.Option("large", "--model", "-m", help="model name under models/ or a model directory"),
    suite: Optional[str] = typer.Option(None, help="a benchmark in the box: blimp"),
    method: str = typer.Option("auto", help="auto | prefix | sentence"),
    batch_size: int = typer.Option(256, help="sequences per forward pass"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (for scripts)"),
) -> None:
    """Score minimal pairs: {"accuracy", "n", "oov", "groups": {UID or construction/condition: ...}}."""
    from agreelens.model import default_device, load_model
    from agreelens.na import BLIMP_DIR, resolve_model
    from agreelens.scoring import read_pairs, score_pairs

    setup_env()
    paths = list(files or [])
    if suite == "blimp":
        paths += sorted(BLIMP_DIR.glob("*.jsonl"))
    elif suite is not None:
        _fail(ValueError(f"unknown suite '{suite}' (known: blimp)"))
    if not paths:
        _fail(ValueError("no pairs given: pass .jsonl files or --suite blimp"))
    try:
        m, vocab = load_model(resolve_model(model), default_device())
        result = score_pairs(m, vocab, read_pairs(paths), batch_size=batch_size, method=method)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    if as_json:
        print(json.dumps(result))
        return
    t = Table(title=f"{model}: {result['accuracy']:.1%} of {result['n']:,} pairs ({result['oov']} OOV, not scored)")
    for col in ("group", "accuracy", "n"):
        t.add_column(col, justify="right")
    for k, g in result["groups"].items():
        t.add_row(k, f"{g['accuracy']:.1%}", f"{g['n']:,}")
    for k, g in result.get("attractors", {}).items():
        t.add_row(f"{k} attractor(s)", f"{g['accuracy']:.1%}", f"{g['n']:,}")
    console.print(t)


@app.command()
def table6(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage 6: reports/table6.md, the paper's Table 6 (PPL and NA accuracy, small vs large)."""
    from agreelens.na import table6 as run

    p = _params(params, profile)
    try:
        console.print(run(p.model_names))
    except FileNotFoundError as err:
        _fail(err)
    print_report(Path("metrics"))


def _print_table7(result: dict, model: str) -> None:
    from agreelens.ablation import table7_rows

    header, rows = table7_rows(result)
    t = Table(title=f"Table 7: ablation on {model} ({result['n']:,} pairs; '-': drop under "
                    f"{result['threshold']:g} points)")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i < 2 else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


@app.command()
def ablate(
    model: str = ModelOpt,
    units: str = typer.Option(..., "--units", "-u", help="comma-separated unit numbers: 1..H layer 1, H+1..2H layer 2"),
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    stimuli_dir: str = StimuliOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (for scripts)"),
) -> None:
    """Table 7: NA accuracy per construction x condition, full model vs ablated units (each, then all)."""
    from agreelens.ablation import run_ablate

    p = _params(params, profile)
    r = _call(run_ablate, p, model, units, stimuli_dir)
    if as_json:
        print(json.dumps(r))
        return
    _print_table7(r, model)
    console.print("overall: " + " · ".join(f"{k} {v:.1%}" for k, v in r["accuracy"].items()))


@app.command()
def sweep(
    model: str = ModelOpt,
    constructions: Optional[str] = typer.Option(
        None, help="comma-separated constructions, e.g. nounpp,simple (default: analysis.sweep_constructions, else all)"
    ),
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    stimuli_dir: str = StimuliOpt,
    chunk: Optional[int] = typer.Option(
        None, min=0, help="units ablated per pass (default scale.sweep_chunk; 0 = 32 on CPU, a layer of up to 256 units on CUDA)"),
) -> None:
    """Ablate every unit alone; writes metrics/units_<model>.json, reports/figures/sweep_<model>.png."""
    from agreelens.ablation import run_sweep

    p = _params(params, profile)
    cons = [c.strip() for c in constructions.split(",") if c.strip()] if constructions else None
    r, out, fig = _call(run_sweep, p, model, cons, stimuli_dir, chunk=chunk)
    t = Table(title=f"number units of {model}: ablation costs >= {r['threshold']:g} points in some condition")
    for col in ("unit", "layer", "index", "max drop", "condition"):
        t.add_column(col, justify="right")
    for u in r["number_units"]:
        t.add_row(str(u["unit"]), str(u["layer"]), str(u["index"]), f"{u['max_drop']:.1f}", u["condition"])
    console.print(t)
    console.print(f"{len(r['number_units'])} number unit(s) of {len(r['drops'])}, {r['pairs']:,} pairs, "
                  f"{r['seconds']:.0f} s -> {out}, {fig}")


@app.command()
def units(
    model: str = ModelOpt,
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    stimuli_dir: str = StimuliOpt,
) -> None:
    """Stage 8: Table 7 for the sweep's top number units (+ analysis.units), Figures 2-3, gate saturation."""
    from agreelens.figures import run_units

    p = _params(params, profile)
    r = _call(run_units, p, model, stimuli_dir)
    _print_table7(r["table7"], model)
    tag = Path(model).name
    console.print(f"figures: reports/figures/units_{tag}.png, reports/figures/saturation_{tag}.png")


@app.command()
def probe(
    model: str = ModelOpt,
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    stimuli_dir: str = StimuliOpt,
) -> None:
    """Probing classifiers: good vs bad sentence from max-pooled states, subject number per word."""
    from agreelens.probe import run_probe, verb_decoding

    p = _params(params, profile)
    r = _call(run_probe, p, model, stimuli_dir)
    cl, best = r["classifier"], verb_decoding(r)
    t = Table(title=f"probes of {model}: held-out accuracy ({cl['n_heldout']:,} held-out sentences)")
    for col in ("construction", "(a) good vs bad", "(b) before verb", "(b) at verb"):
        t.add_column(col, justify="right")
    for cons, v in cl["constructions"].items():
        b = best.get(cons, {})
        t.add_row(cons, f"{v['accuracy']:.1%}",
                  *[f"{b[k][0]:.1%} ({b[k][1]})" if k in b else "-" for k in ("before", "at")])
    console.print(t)
    tag = Path(model).name
    console.print(f"overall (a) {cl['accuracy']:.1%} -> metrics/probe_{tag}.json, reports/figures/probe_{tag}.png")


@app.command("build-report")
def build_report(params: str = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Stage 9: reports/report.md: Table 6, Table 7 of the discovered units, figures, the paper beside."""
    from agreelens.report import build

    p = _params(params, profile)
    try:
        out = build(p.model_names)
    except (FileNotFoundError, KeyError) as err:
        _fail(err)
    console.print(f"wrote {out}")


@app.command()
def register(
    model: str = typer.Option(..., "--model", "-m", help="model name (small, large) with metrics from `dvc repro`"),
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
) -> None:
    """Stage: register a trained model in the MLflow Model Registry (`champion` moves only to a better model);
    metrics/register_<model>.json records the version and its aliases."""
    from agreelens.registry import register_model, write_record

    p = _params(params, profile)
    try:
        d = register_model(p, model)
    except FileNotFoundError as err:
        _fail(err)
    out = write_record(d, Path("metrics") / f"register_{Path(model).name}.json")
    console.print(f"{d.name} version {d.version} -> @{d.alias}: {d.reason} ({out})")


@app.command("stages")
def stages_cmd(
    emit: bool = typer.Option(False, "--emit", help="write dvc.yaml (--out) from the registry agreelens/stages.py"),
    check: bool = typer.Option(False, "--check", help="exit 1 when dvc.yaml (--out) differs from the registry's"),
    out: str = typer.Option("dvc.yaml", "--out", help="the pipeline file to write or check"),
    needed_for: Optional[list[str]] = typer.Option(
        None, "--for", help="print only the commands this stage (DVC address, e.g. calibrate@large) needs, "
        "one per line, in run order (repeatable)"),
    params: str = ParamsOpt,
) -> None:
    """The pipeline's stages in run order (agreelens/stages.py): command, outputs, code dependencies."""
    from agreelens import stages as reg

    p = _params(params, None)
    if needed_for:
        for _, cmd in _call(reg.upstream, reg.declare(p), list(needed_for)):
            print(cmd)
        return
    if emit or check:
        text = _call(reg.emit, params)
        if check:
            if not Path(out).is_file() or Path(out).read_text(encoding="utf-8") != text:
                _fail(ValueError(f"{out} differs from the stage registry: run `agreelens stages --emit`"))
            console.print(f"{out} is the registry's")
        else:
            Path(out).write_text(text, encoding="utf-8")
            console.print(f"wrote {out} ({len(reg.order(reg.declare(p)))} stages)")
        return
    t = Table(title="pipeline stages, in the order `dvc repro` and flows/pipeline.py run them")
    for col in ("#", "stage", "command", "outputs", "code"):
        t.add_column(col, justify="right" if col == "#" else "left")
    i = 0
    for s in reg.registry(p):
        for addr, model in s.instances():
            i += 1
            cmd = s.cmd.replace(reg.ITEM, model) if model else s.cmd
            t.add_row(str(i), addr, cmd, ", ".join(s.files(model)["outs"]),
                      f"{len(s.code)} modules: " + ", ".join(Path(c).stem for c in reg.entry_modules(s.command)) + " ...")
    console.print(t)


@app.command("validate")
def validate_data(
    suite: str = typer.Option(..., "--suite", "-s", help="raw (corpora + prepared vocabulary), augmented (augmented/pairs.tsv) or syntax (syntax/pairs.tsv)"),
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
) -> None:
    """Data-quality gate (Great Expectations) before training: exits 1 if an expectation fails;
    writes reports/quality/<suite>.json and .md."""
    from agreelens.quality import QualityGateError, validate

    p = _params(params, profile)
    try:
        summary = validate(p, suite)
    except QualityGateError as err:
        _print_quality(err.summary)
        _fail(err)
    except (OSError, ValueError) as err:
        _fail(err)
    _print_quality(summary)


def _print_quality(summary: dict) -> None:
    t = Table(title=f"quality gate {summary['suite']}: {'passed' if summary['success'] else 'FAILED'}")
    for col in ("expectation", "column", "result", "observed", "failing rows"):
        t.add_column(col, justify="left" if col in ("expectation", "column") else "right")
    for e in summary["expectations"]:
        obs = e["observed"]
        obs = f"{obs:.6g}" if isinstance(obs, float) else f"{obs:,}" if isinstance(obs, int) else "-" if obs is None else str(obs)
        t.add_row(e["name"], f"{e['table']}.{e['column'] or ''}".rstrip("."), "pass" if e["success"] else "[red]FAIL[/red]",
                  obs, f"{e['unexpected_count']:,}" if "unexpected_count" in e else "")
    console.print(t)
    console.print(f"report: {summary['report']}")


@app.command()
def schedule(
    once: bool = typer.Option(False, "--once", help="check (and retrain) once, then exit: for cron jobs and tests"),
    force: bool = typer.Option(False, "--force", help="with --once: retrain even when the corpora are unchanged"),
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
) -> None:
    """Retrain when the corpora change: serves the Prefect deployment agreelens-retrain (schedule.cron or
    schedule.interval_minutes); each run compares data/'s DVC md5 with the champions' data_dvc_md5 tag
    and, if they differ, runs `dvc commit data.dvc`, `dvc repro` and registration."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "flows" / "schedule.py").is_file():
        _fail(FileNotFoundError(f"{root / 'flows' / 'schedule.py'} not found: run from a checkout of agreelens"))
    p = _params(params, profile)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from flows.schedule import retrain_flow, serve

    if not once:
        when = f"cron '{p.schedule.cron}'" if p.schedule.cron else f"every {p.schedule.interval_minutes} min"
        console.print(f"serving deployment agreelens-retrain/agreelens-retrain ({when}); Ctrl-C stops")
        serve(params, profile)
        return
    try:
        result = retrain_flow(params, profile, force=force)
    except Exception as err:  # noqa: BLE001 - the flow run failed: its message says why
        _fail(err)
    console.print(result["reason"], soft_wrap=True)
    for d in (result.get("registry") or {}).values():
        console.print(f"{d['name']} version {d['version']} -> @{d['alias']}: {d['reason']}", soft_wrap=True)


@app.command()
def calibrate(
    model: str = typer.Option("large", "--model", "-m", help="model name under models/ or a model directory"),
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (for scripts)"),
) -> None:
    """Agreement checker: the operating point with the fewest misses at the false-alarm budget (dev set of the
    checker benchmark), measured on its test set and BLiMP."""
    from agreelens.calibration import run_calibrate

    p = _params(params, profile)
    r = _call(run_calibrate, p, model)
    tag = r["model"]
    if as_json:
        print(json.dumps({k: v for k, v in r.items() if k not in ("lexicon", "readout")}))
        return
    op = r["operating_point"]
    t = Table(title=f"checker {tag}: evidence {op['evidence']}, error score > {op['error_at']:.3f} "
                    f"({len(r['lexicon']['verbs'])} verbs in the lexicon)")
    for col in ("set", "sentences", "false alarms / 100", "unsure / 100", "errors", "caught / 100"):
        t.add_column(col, justify="right")
    for name in ("dev", "test"):
        a = r[name]["all"]
        t.add_row(name, f"{a['sentences']:,}", f"{a['false_alarms_per_100']}", f"{a['unsure_per_100']}",
                  f"{a['errors']:,}", f"{a['caught_per_100']}")
    console.print(t)
    for ev, row in r["dev"]["candidates"].items():
        console.print(f"dev, evidence {ev}: {row['false_alarms_per_100']} false alarms and {row['caught_per_100']} "
                      "caught per 100")
    if r["blimp"].get("covered"):
        b = r["blimp"]
        console.print(f"BLiMP agreement pairs: {b['covered']:,} covered, F1 {b['f1']:.3f}, both sentences right "
                      f"{100 * b['pairs_both_right']:.1f} %")
    console.print(f"-> metrics/calibration_{tag}.json")


@app.command()
def check(
    text: str = typer.Argument(..., help="text to check (quote it)"),
    model: str = typer.Option("large", "--model", "-m", help="model name, model directory or models:/name@alias"),
    params: str = ParamsOpt,
    profile: Optional[str] = ProfileOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (for scripts)"),
) -> None:
    """Agreement checker: flag subject-verb and determiner-noun number errors, suggest the other form."""
    import torch

    from agreelens.checker import InputError, load_checker

    p = _params(params, profile)
    torch.set_num_threads(p.service.threads)
    try:
        checker = load_checker(model, p)
        r = checker.check(text)
    except InputError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    if as_json:
        print(json.dumps(r))
        return
    exp = r["operating_point"].get("expected") or {}
    t = Table(title=f"{r['model']}: {r['n_errors']} of {r['n_sites']} agreement site(s) flagged, {r['n_unsure']} unsure"
                    + (f" (expected {exp['false_alarms_per_100']} false alarms per 100 correct sentences)"
                       if exp.get("false_alarms_per_100") is not None else ""))
    for col in ("site", "sentence", "word", "kind", "margin", "verdict", "suggestion", "confidence", "decided by"):
        t.add_column(col, justify="right" if col in ("site", "sentence", "margin", "confidence") else "left")
    for sent in r["sentences"]:
        for s in sent["sites"]:
            verdict = {"error": "[red]error[/red]", "unsure": "[yellow]unsure[/yellow]"}.get(s["verdict"], "ok")
            conf = "" if s["confidence"] is None else f"{s['confidence']:.2f}"
            t.add_row(str(s["site"]), str(sent["index"]), s["word"], s["kind"], f"{s['margin']:+.2f}", verdict,
                      s["suggestion"] or "", conf, s["evidence"]["decided_by"])
    console.print(t)
    for note in r["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


@app.command()
def report(metrics: str = typer.Option("metrics", help="folder of the pipeline's metrics")) -> None:
    """Print the results table from the pipeline's metrics."""
    print_report(Path(metrics))


def print_report(folder: Path) -> None:
    path = folder / "eval.json"
    if not path.is_file():
        _fail(FileNotFoundError(f"{path}: no results yet; run `dvc repro` (or `make run`)"))
    results = json.loads(path.read_text())
    t = Table(title="agreelens results (paper: small 110.2 PPL / 89.3 % NA, large 51.0 PPL / 99.57 % NA)")
    for col in ("model", "train tokens", "epochs", "train min", "valid PPL", "test PPL", "NA accuracy"):
        t.add_column(col, justify="right")
    for name, r in results.items():
        na = folder / f"na_{name}.json"
        na_acc = f"{json.loads(na.read_text())['accuracy']:.1%}" if na.is_file() else "-"
        t.add_row(
            name, f"{r.get('train_tokens', 0):,}", f"{r.get('epochs', 0):.2f}", f"{r.get('train_seconds', 0) / 60:.1f}",
            f"{r.get('best_valid_ppl', float('nan')):.1f}", f"{r['test_ppl']:.1f}", na_acc,
        )
    console.print(t)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted; run the same command again to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
