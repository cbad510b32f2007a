"""The pipeline's stages, each declared once: the single source of ``dvc.yaml``, of the order in which the
Prefect flow (``flows/pipeline.py``) runs them and of ``agreelens stages``.

A :class:`Stage` holds its ``agreelens`` command, the data it reads, its params keys, outputs, metrics and
plots; paths come from the settings that own them (``prepare.out``, ``augment.out``, ``natural.out``, ...).
Its code dependencies are computed, never listed by hand: the ``agreelens`` modules that the command's
function in ``agreelens/cli.py`` imports (with the CLI's own top-level imports and the helpers of cli.py it
calls), and everything those modules import in turn, top-level and inside functions (a static walk of the
package's syntax trees; imports under ``if TYPE_CHECKING:`` are not run and not counted). Training's
checkpoint fingerprint hashes the same modules (:func:`code_files`).

``agreelens stages --emit`` writes ``dvc.yaml``; ``STAGES`` order is topological (every stage comes after the
stages whose outputs it reads; :func:`check_order`).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from agreelens.config import Params

PACKAGE = Path(__file__).resolve().parent
ITEM = "${item}"

HEADER = """\
# `dvc repro` rebuilds every table and figure; each stage is one `agreelens` entry point with explicit
# inputs and outputs, and its params namespaced by stage in params.yaml (`profile` picks an overlay: the
# only switch, read from params.yaml by every command below). The code dependencies are the agreelens
# modules each command imports. Generated from agreelens/stages.py by `agreelens stages --emit`: edit the
# registry there, not this file.
"""


@dataclass(frozen=True)
class Path_:
    """A dependency or an output of a stage, with DVC's options (``cache``, a plot's ``x``/``y``) and an
    optional comment written after it in ``dvc.yaml``."""

    path: str
    cache: bool = True
    x: str | None = None
    y: str | None = None
    comment: str = ""

    def options(self) -> dict:
        opts: dict = {} if self.cache else {"cache": False}
        opts.update({k: v for k, v in (("x", self.x), ("y", self.y)) if v})
        return opts


def _paths(items) -> tuple[Path_, ...]:
    return tuple(p if isinstance(p, Path_) else Path_(p) for p in items)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. ``foreach``: DVC runs it once per model (``name@model``, ``${item}`` in its
    fields); ``per_model``: one stage per model named ``<name>_<model>`` instead (``train_small``)."""

    name: str
    cmd: str
    deps: tuple[Path_, ...] = ()
    params: tuple[str, ...] = ()
    outs: tuple[Path_, ...] = ()
    metrics: tuple[Path_, ...] = ()
    plots: tuple[Path_, ...] = ()
    foreach: tuple[str, ...] = ()
    per_model: tuple[str, ...] = ()
    comment: str = ""
    code: tuple[str, ...] = field(default=(), compare=False)  # filled by :func:`registry`

    @property
    def command(self) -> str:
        """The ``agreelens`` subcommand that runs the stage."""
        return self.cmd.split()[1]

    def instances(self) -> Iterator[tuple[str, str | None]]:
        """``(DVC address, model or None)`` of every stage DVC runs for this declaration."""
        if self.foreach:
            yield from ((f"{self.name}@{m}", m) for m in self.foreach)
        elif self.per_model:
            yield from ((f"{self.name}_{m}", m) for m in self.per_model)
        else:
            yield self.name, None

    def files(self, model: str | None = None) -> dict[str, list[str]]:
        """Paths of one instance: ``deps`` (data and code), ``outs`` (outs, metrics and plots)."""
        sub = (lambda s: s.replace(ITEM, model)) if model else (lambda s: s)
        return {"deps": [sub(d.path) for d in self.deps] + list(self.code),
                "outs": [sub(o.path) for o in (*self.outs, *self.metrics, *self.plots)]}


# ------------------------------------------------------------------------------------------ the stages


def declare(p: Params) -> list[Stage]:
    """Every stage of the pipeline, in the order ``dvc repro`` and the flow run them (code deps empty)."""
    models = tuple(p.model_names)
    data, prep, aug, parsed, syn = p.data.root, p.prepare.out, p.augment.out, p.syntax.parsed, p.syntax.out
    nat, bench, quality = p.natural.out, p.checkbench.out, p.quality.out
    m = ITEM
    profile = ("profile", "profiles")
    nocache = functools.partial(Path_, cache=False)

    def stage(name, cmd, deps=(), params=(), outs=(), metrics=(), plots=(), **kw) -> Stage:
        return Stage(name, cmd, _paths(deps), tuple(params), _paths(outs), _paths(metrics), _paths(plots), **kw)

    return [
        stage("prepare", "agreelens prepare", [data], [*profile, "data", "prepare"], [prep],
              [nocache("metrics/prepare.json")]),
        stage("stimuli", "agreelens stimuli", [f"{prep}/vocab.txt", f"{prep}/counts.tsv"], ["stimuli"], ["stimuli"],
              [nocache("metrics/stimuli.json")]),
        stage("natural", "agreelens natural", [data, prep],
              [*profile, "natural", "prepare.seed", "prepare.valid_frac", "prepare.test_frac"], [nocache(nat)],
              [nocache("metrics/natural.json")],
              comment="natural-text agreement benchmark from held-out text (spaCy parse), dev and test"),
        stage("checkbench", "agreelens checkbench", [nat, data, prep], [*profile, "checkbench", "natural"],
              [nocache(bench)], [nocache("metrics/checkbench.json")],
              comment="the agreement checker's benchmark: held-out sentences, correct and with one site swapped"),
        stage("validate_raw", "agreelens validate --suite raw", [data, f"{prep}/vocab.txt", f"{prep}/train_large.txt"],
              ["quality", "stimuli"], [nocache(f"{quality}/raw.json"), nocache(f"{quality}/raw.md")],
              comment="Great Expectations gate: nothing trains (not even the masked LM) on a failing corpus"),
        stage("finetune_mlm", "agreelens finetune-mlm", [f"{prep}/train_large.txt", f"{quality}/raw.json"],
              [*profile, "augment.enabled", "augment.mlm", "augment.finetune_steps", "augment.finetune_batch",
               "augment.finetune_lr", "augment.seed"], ["models/mlm"], [nocache("metrics/mlm.json")],
              [nocache("plots/mlm_loss.csv", x="step", y="loss")]),
        stage("augment", "agreelens augment",
              ["models/mlm", f"{prep}/train_large.txt", f"{prep}/train_small.txt", f"{prep}/vocab.txt"],
              [*profile, "augment"], [aug], [nocache("metrics/augment.json")]),
        stage("validate_augmented", "agreelens validate --suite augmented", [aug], ["quality"],
              [nocache(f"{quality}/augmented.json"), nocache(f"{quality}/augmented.md")],
              comment="Great Expectations gate on the synthetic text"),
        stage("parse", "agreelens parse", [f"{prep}/train_large.txt"],
              ["syntax.parsed", "syntax.min_len", "syntax.max_len", "syntax.batch_size"], [parsed],
              comment="the training split parsed once (spaCy): agreement sites and noun modifiers"),
        stage("augment_syntax", "agreelens augment-syntax",
              [parsed, f"{aug}/train_small.txt", f"{aug}/train_large.txt", f"{prep}/train_small.txt",
               f"{prep}/train_large.txt"], [*profile, "syntax"], [syn], [nocache("metrics/syntax.json")],
              comment="modifiers with nouns of the other number inserted between subject and verb"),
        stage("validate_syntax", "agreelens validate --suite syntax", [f"{syn}/pairs.tsv"],
              ["syntax.min_len", "syntax.max_len"], [nocache(f"{quality}/syntax.json"), nocache(f"{quality}/syntax.md")],
              comment="Great Expectations gate on the inserted modifiers"),
        stage("train", f"agreelens train --model {m}",
              [f"{syn}/train_{m}.txt", f"{quality}/raw.json", f"{quality}/augmented.json", f"{quality}/syntax.json",
               f"{prep}/valid.txt", f"{prep}/vocab.txt",
               Path_("stimuli", comment="scored at every validation (dev lexicon): the NA-accuracy learning curve"),
               Path_(p.train.na_natural, comment="... and the natural-text dev items with attractors")],
              [*profile, "model", "train"], [f"models/{m}"], [nocache(f"metrics/train_{m}.json")],
              [nocache(f"plots/learning_{m}.csv", x="tokens", y="valid_ppl"), nocache(f"plots/learning_{m}.png")],
              per_model=models),
        stage("evaluate", "agreelens evaluate", [*(f"models/{x}" for x in models), f"{prep}/test.txt"],
              [*profile, "evaluate"], metrics=[nocache("metrics/eval.json")],
              plots=[nocache("reports/figures/learning_curves.png")]),
        stage("evaluate_na", f"agreelens evaluate-na --model {m}", [f"models/{m}", "stimuli", nat, f"{data}/blimp"],
              ["evaluate"], metrics=[nocache(f"metrics/na_{m}.json")], foreach=models),
        stage("calibrate", f"agreelens calibrate --model {m}",
              [f"models/{m}", bench, "stimuli/dev", f"{prep}/train_small.txt", f"{prep}/train_large.txt",
               f"{data}/blimp"],
              ["service.false_alarm_budget", "service.unsure_budget", "service.parser", "service.parse_budget"],
              metrics=[nocache(f"metrics/calibration_{m}.json")], foreach=models,
              comment="the agreement checker's operating point (dev), its false alarms and catches (test)"),
        stage("table6", "agreelens table6", ["metrics/eval.json", *(f"metrics/na_{x}.json" for x in models)],
              outs=[nocache("reports/table6.md")]),
        stage("sweep", f"agreelens sweep --model {m}", [f"models/{m}", "stimuli"],
              ["analysis.sweep_constructions", "analysis.threshold"], metrics=[nocache(f"metrics/units_{m}.json")],
              plots=[nocache(f"reports/figures/sweep_{m}.png")], foreach=models),
        stage("units", f"agreelens units --model {m}",
              [f"models/{m}", "stimuli", f"{prep}/valid.txt", f"metrics/units_{m}.json"], ["analysis"],
              metrics=[nocache(f"metrics/table7_{m}.json")],
              plots=[nocache(f"reports/figures/units_{m}.png"), nocache(f"reports/figures/saturation_{m}.png")],
              foreach=models),
        stage("probe", f"agreelens probe --model {m}", [f"models/{m}", "stimuli"], ["analysis"],
              metrics=[nocache(f"metrics/probe_{m}.json")], plots=[nocache(f"reports/figures/probe_{m}.png")],
              foreach=models),
        stage("report", "agreelens build-report",
              ["metrics/eval.json", *(f"metrics/{k}_{x}.json" for k in ("na", "units", "table7", "probe")
                                      for x in models),
               "metrics/augment.json", "metrics/mlm.json", f"{quality}/raw.json", f"{quality}/augmented.json",
               Path_("reports/augment_safety", comment="studies the report shows (bench/, committed)"),
               "reports/studies/agreement_levers"],
              outs=[nocache("reports/report.md")], plots=[nocache("reports/figures/natural_attractors.png")]),
        stage("register", f"agreelens register --model {m}",
              [f"models/{m}", "metrics/eval.json", f"metrics/na_{m}.json", f"metrics/units_{m}.json",
               f"metrics/calibration_{m}.json", "stimuli", f"{nat}/test.jsonl", "reports/report.md",
               f"reports/figures/units_{m}.png"], ["registry"],
              metrics=[nocache(f"metrics/register_{m}.json")], foreach=models,
              comment="MLflow Model Registry: the version registered and its alias (champion only if better)"),
    ]


def registry(p: Params, package: Path = PACKAGE) -> list[Stage]:
    """:func:`declare` with every stage's code dependencies (modules of ``package``) filled in."""
    from dataclasses import replace

    return [replace(s, code=tuple(code_deps(s.command, package))) for s in declare(p)]


def find(stages: list[Stage], name: str) -> Stage:
    for s in stages:
        if s.name == name:
            return s
    raise KeyError(f"no stage '{name}' (known: {', '.join(s.name for s in stages)})")


# ------------------------------------------------------------------------------------------ code dependencies


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.AST, package: Path) -> set[str]:
    """Modules of ``package`` that the statements under ``node`` import (``from agreelens.x import ...``,
    ``from agreelens import x``, ``import agreelens.x``), at any depth; ``if TYPE_CHECKING:`` bodies skipped."""
    out: set[str] = set()
    name = package.name

    def visit(n: ast.AST) -> None:
        if isinstance(n, ast.If) and _is_type_checking(n.test):
            for child in n.orelse:
                visit(child)
            return
        if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            parts = n.module.split(".")
            if parts[0] == name and len(parts) > 1:
                out.add(parts[1])
            elif n.module == name:
                out.update(a.name for a in n.names if (package / f"{a.name}.py").is_file())
        elif isinstance(n, ast.Import):
            out.update(a.name.split(".")[1] for a in n.names if a.name.startswith(f"{name}."))
        for child in ast.iter_child_nodes(n):
            visit(child)

    visit(node)
    return {m for m in out if (package / f"{m}.py").is_file()}


@functools.lru_cache(maxsize=8)
def import_graph(package: Path = PACKAGE) -> dict[str, frozenset[str]]:
    """``{module: modules of the package it imports}`` for every ``<package>/*.py``."""
    return {f.stem: frozenset(_imported(ast.parse(f.read_text(encoding="utf-8")), package) - {f.stem})
            for f in sorted(package.glob("*.py"))}


REGISTRY = Path(__file__).stem  # this module: it describes the stages and computes nothing they write


def closure(modules, package: Path = PACKAGE) -> list[str]:
    """``modules`` and every module of the package they import, transitively (sorted); the registry itself
    is left out, so that declaring a stage never makes the others' code look changed."""
    graph, seen, todo = import_graph(package), {REGISTRY}, list(modules)
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(graph.get(mod, ()))
    return sorted(seen - {REGISTRY})


def _command_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """``{CLI command name: its function}`` from the ``@app.command(...)`` decorators of cli.py (typer's
    default name: the function's, underscores as hyphens)."""
    out = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for dec in fn.decorator_list:
            if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "command":
                named = [a.value for a in dec.args if isinstance(a, ast.Constant)]
                out[named[0] if named else fn.name.replace("_", "-")] = fn
    return out


@functools.lru_cache(maxsize=64)
def entry_modules(command: str, package: Path = PACKAGE) -> tuple[str, ...]:
    """The modules that implement ``agreelens <command>``: those its function in cli.py imports, those the
    cli.py helpers it calls import, and cli.py's own top-level imports (settings, tracking)."""
    tree = ast.parse((package / "cli.py").read_text(encoding="utf-8"))
    commands = _command_functions(tree)
    if command not in commands:
        raise KeyError(f"`agreelens {command}` is not a command of {package / 'cli.py'}")
    helpers = {fn.name: fn for fn in tree.body if isinstance(fn, ast.FunctionDef)}
    top = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.If)):
            top |= _imported(stmt, package)
    found, seen, todo = set(top), set(), [commands[command]]
    while todo:
        fn = todo.pop()
        if fn.name in seen:
            continue
        seen.add(fn.name)
        found |= _imported(fn, package)
        todo.extend(helpers[c.func.id] for c in ast.walk(fn)
                    if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in helpers)
    return tuple(sorted(found - {"cli"}))


def code_modules(command: str, package: Path = PACKAGE) -> list[str]:
    """Every module ``agreelens <command>`` runs: :func:`entry_modules` and all they import."""
    return closure(entry_modules(command, package), package)


def code_deps(command: str, package: Path = PACKAGE) -> list[str]:
    """:func:`code_modules` as the paths ``dvc.yaml`` lists (``agreelens/<module>.py``)."""
    return [f"{package.name}/{m}.py" for m in code_modules(command, package)]


def code_files(command: str, package: Path = PACKAGE) -> list[Path]:
    """:func:`code_modules` as files: what a run of ``agreelens <command>`` depends on."""
    return [package / f"{m}.py" for m in code_modules(command, package)]


# ------------------------------------------------------------------------------------------ order and dvc.yaml


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_order(stages: list[Stage]) -> None:
    """Raise ``ValueError`` unless every stage comes after the stages producing what it reads (an output
    equal to, inside or above one of its deps), no two stages write the same path and names are unique."""
    made: dict[str, str] = {}
    names = [addr for s in stages for addr, _ in s.instances()]
    if len(names) != len(set(names)):
        raise ValueError(f"stage names repeat: {names}")
    later = {addr: [o for o in s.files(m)["outs"]] for s in stages for addr, m in s.instances()}
    for s in stages:
        for addr, model in s.instances():
            del later[addr]
            for dep in s.files(model)["deps"]:
                for other, outs in later.items():
                    if any(_inside(dep, o) or _inside(o, dep) for o in outs):
                        raise ValueError(f"stage {addr} reads {dep}, written by {other} which comes after it")
            for out in s.files(model)["outs"]:
                if out in made:
                    raise ValueError(f"{out} is written by both {made[out]} and {addr}")
                made[out] = addr


def order(stages: list[Stage]) -> list[str]:
    """DVC addresses of every stage instance, in run order."""
    return [addr for s in stages for addr, _ in s.instances()]


def upstream(stages: list[Stage], targets: list[str]) -> list[tuple[str, str]]:
    """``(DVC address, command)`` of the targets (DVC addresses) and every stage instance whose outputs
    they read, directly or not, in run order. ``ValueError`` names an unknown target."""
    rows = [(addr, s.cmd.replace(ITEM, m) if m else s.cmd, s.files(m))
            for s in stages for addr, m in s.instances()]
    known = [addr for addr, _, _ in rows]
    for t in targets:
        if t not in known:
            raise ValueError(f"no stage {t!r}; stages: {', '.join(known)}")
    need = set(targets)
    for addr, _, files in reversed(rows):  # producers come before readers (check_order)
        if addr not in need:
            continue
        for other, _, ofiles in rows:
            if other != addr and any(_inside(d, o) or _inside(o, d) for d in files["deps"] for o in ofiles["outs"]):
                need.add(other)
    return [(addr, cmd) for addr, cmd, _ in rows if addr in need]


def _entry(path: Path_, indent: str) -> list[str]:
    comment = f"  # {path.comment}" if path.comment else ""
    opts = path.options()
    if not opts:
        return [f"{indent}- {path.path}{comment}"]
    return [f"{indent}- {path.path}:{comment}",
            *(f"{indent}    {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items())]


def _body(s: Stage, model: str | None, indent: str) -> list[str]:
    sub = (lambda x: x.replace(ITEM, model)) if model else (lambda x: x)

    def mapped(items: tuple[Path_, ...]) -> tuple[Path_, ...]:
        return tuple(Path_(sub(p.path), p.cache, p.x, p.y, p.comment) for p in items)

    lines = [f"{indent}cmd: {sub(s.cmd)}"]
    sections = (("deps", mapped(s.deps) + _paths(s.code)), ("params", _paths(s.params)),
                ("outs", mapped(s.outs)), ("metrics", mapped(s.metrics)), ("plots", mapped(s.plots)))
    for key, items in sections:
        if items:
            lines.append(f"{indent}{key}:")
            for item in items:
                lines += _entry(item, indent + "  ")
    return lines


def dvc_yaml(stages: list[Stage]) -> str:
    """The text of ``dvc.yaml`` for ``stages`` (with their code deps): the header, then one block a stage."""
    blocks = []
    for s in stages:
        comment = f"  # {s.comment}" if s.comment else ""
        if s.foreach:
            blocks.append([f"  {s.name}:{comment}", f"    foreach: [{', '.join(s.foreach)}]", "    do:",
                           *_body(s, None, "      ")])
        elif s.per_model:
            blocks += [[f"  {addr}:{comment}", *_body(s, model, "    ")] for addr, model in s.instances()]
        else:
            blocks.append([f"  {s.name}:{comment}", *_body(s, None, "    ")])
    return HEADER + "stages:\n" + "\n\n".join("\n".join(b) for b in blocks) + "\n"


def emit(params_path: str | Path = "params.yaml", out: str | Path | None = None, package: Path = PACKAGE) -> str:
    """``dvc.yaml`` from the registry over ``params_path``'s settings; written to ``out`` when given."""
    from agreelens.config import load_params

    stages = registry(load_params(params_path, env=False), Path(package))
    check_order(stages)
    text = dvc_yaml(stages)
    if out is not None:
        Path(out).write_text(text, encoding="utf-8")
    return text
