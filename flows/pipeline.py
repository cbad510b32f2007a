"""Prefect 3 flows: the study as observable, retried tasks over the same library functions that the
``agreelens`` commands in ``dvc.yaml`` call, writing the same outputs.

    python flows/pipeline.py [--profile tiny] [--register]

``pipeline`` runs the stages of the registry ``agreelens/stages.py`` (the source of ``dvc.yaml``) in its
order, one step each (``STEPS``): prepare → stimuli → natural benchmark → checker benchmark → quality gate
``raw`` → fine-tune MLM → augment → quality gate ``augmented`` → parse → syntax augmentation → quality gate
``syntax`` → train (``train_flow``: small, large) → evaluate → NA accuracy and BLiMP (``benchmark_flow``) →
calibrate → Table 6 → unit sweep (``sweep_flow`` = flow ``ablate``) → units → probes (``probe_flow``) →
report → register (``register_flow``, MLflow registry; with ``--register``). A failed gate fails the run
(its message names the report ``reports/quality/<suite>.md``) and nothing after it runs. Markdown artifacts
hold the key results. With ``scale.dask`` set in params.yaml the sweep (in chunks of units) and the benchmark
scoring run as tasks on a Prefect ``DaskTaskRunner``. Run in the project folder (paths are the
pipeline's). For lineage use ``dvc repro``: it runs the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.settings import get_current_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreelens.config import Params, load_params  # noqa: E402
from agreelens.tracking import setup_env  # noqa: E402


# ------------------------------------------------------------------------------------------ tasks
# Retries only where a failure can be transient I/O (restoring archives, the tracking store); the
# compute tasks and the quality gates fail the same way every time, so they are not retried.


@task(retries=2, retry_delay_seconds=2)  # I/O: restoring data/ from the committed archives
def restore_data() -> list[str]:
    from agreelens.data import restore

    return restore("data", "corpora")


@task
def prepare_task(params: Params) -> dict:
    from agreelens.corpus import prepare

    return prepare(params)


@task
def stimuli_task(params: Params) -> dict:
    from agreelens.na import make_stimuli

    return make_stimuli(params)


@task
def natural_task(params: Params) -> dict:
    """The natural-text agreement benchmark (``natural/{dev,test}.jsonl``) from held-out text."""
    from pathlib import Path

    from agreelens.natural import build

    return build(params, train_files=sorted(Path(params.prepare.out).glob("train_*.txt")), progress=False)


@task
def checkbench_task(params: Params) -> dict:
    """The agreement checker's benchmark (``checkbench/{dev,test}.jsonl``)."""
    from agreelens.checkbench import build

    return build(params, progress=False)


@task(task_run_name="quality-gate-{suite}")
def quality_gate_task(params: Params, suite: str) -> dict:
    """Great Expectations suite ``raw``, ``augmented`` or ``syntax``; raises ``QualityGateError`` (naming the failed
    expectations and ``reports/quality/<suite>.md``) and so stops the pipeline when one fails."""
    from agreelens.quality import QualityGateError, validate

    try:
        summary = validate(params, suite)
    except QualityGateError as err:
        create_markdown_artifact(_gate_markdown(params, suite, getattr(err, "summary", None), str(err)),
                                 key=f"quality-{suite}", description=f"data-quality gate '{suite}': FAILED")
        raise
    create_markdown_artifact(_gate_markdown(params, suite, summary), key=f"quality-{suite}",
                             description=f"data-quality gate '{suite}': passed")
    return summary


@task
def finetune_task(params: Params) -> dict:
    from agreelens.augment import run_finetune

    return run_finetune(params, progress=False)


@task
def augment_task(params: Params) -> dict:
    from agreelens.augment import run_augment

    return run_augment(params, progress=False)


@task
def parse_task(params: Params) -> dict:
    from agreelens.syntax import run_parse

    return run_parse(params, progress=False)


@task
def augment_syntax_task(params: Params) -> dict:
    from agreelens.syntax import run_augment_syntax

    return run_augment_syntax(params)


@task
def train_task(params: Params, name: str) -> dict:
    from agreelens.train import train

    return train(params, name, quiet=True)


@task
def evaluate_task(params: Params) -> dict:
    from agreelens.evaluate import evaluate

    return evaluate(params)


@task(task_run_name="evaluate-na-{name}")
def evaluate_na_task(params: Params, name: str) -> dict:
    from agreelens.na import evaluate_na

    return evaluate_na(params, name)


@task
def table6_task(params: Params) -> str:
    from agreelens.na import table6

    return table6(params.model_names)


@task(task_run_name="sweep-{name}")
def sweep_task(params: Params, name: str) -> dict:
    from agreelens.ablation import run_sweep

    return run_sweep(params, name, chunk=params.scale.sweep_chunk, progress=False)[0]


@task(task_run_name="sweep-{name}-part-{index}")
def sweep_part_task(params: Params, name: str, index: int, chunks: list[list[int]]) -> dict:
    """One part of a model's sweep: the units of ``chunks`` (part 0 also scores the full model)."""
    from agreelens.ablation import run_sweep_part

    return run_sweep_part(params, name, chunks, full=index == 0)


@task(task_run_name="sweep-{name}-merge")
def sweep_merge_task(params: Params, name: str, parts: list[dict], seconds: float) -> dict:
    from agreelens.ablation import finish_sweep

    return finish_sweep(params, name, parts, seconds)[0]


@task
def units_task(params: Params, name: str) -> list[int]:
    from agreelens.figures import run_units

    return run_units(params, name)["units"]


@task
def probe_task(params: Params, name: str) -> dict:
    from agreelens.probe import run_probe

    return run_probe(params, name)


@task
def report_task(params: Params) -> str:
    from agreelens.report import build

    return str(build(params.model_names))


@task(task_run_name="calibrate-{name}")
def calibrate_task(params: Params, name: str) -> dict:
    """The checker's operating point for this model (``metrics/calibration_<name>.json``), registered with it."""
    from agreelens.calibration import run_calibrate

    r = run_calibrate(params, name)
    return {"operating_point": r["operating_point"], "test": r["test"]["all"]}


@task(retries=2, retry_delay_seconds=5)  # I/O: the tracking/registry store
def register_task(params: Params, name: str) -> dict:
    """Register ``models/<name>``; ``metrics/register_<name>.json`` records the version and its aliases (as
    the register stage of dvc.yaml)."""
    from agreelens.registry import register_model, write_record

    d = register_model(params, name)
    write_record(d, Path("metrics") / f"register_{name}.json")
    return vars(d)


# ------------------------------------------------------------------------------------------ helpers


def task_runner(params: Params):
    """The task runner that ``params.scale`` asks for: ``None`` (off: tasks run in the flow's process),
    a ``DaskTaskRunner`` over a new ``LocalCluster`` (``dask: local``) or over a running scheduler."""
    scale = params.scale
    if not scale.dask:
        return None
    from prefect_dask import DaskTaskRunner

    if scale.dask == "local":
        kwargs = {"n_workers": scale.workers, "threads_per_worker": scale.threads_per_worker,
                  "processes": scale.processes, "dashboard_address": "127.0.0.1:0"}  # loopback, a free port
        if scale.processes:
            kwargs["host"] = "127.0.0.1"
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
    return DaskTaskRunner(address=scale.dask)


def _with_runner(subflow, runner):
    return subflow.with_options(task_runner=runner) if runner is not None else subflow


def sweep_parts(params: Params, name: str) -> list[list[list[int]]]:
    """Model ``name``'s sweep passes (``scale.sweep_chunk`` units each; 0: by this machine's device) in
    ``scale.sweep_tasks`` contiguous parts (0: one part per pass). Contiguous, so a part's passes mostly
    share their lower layers."""
    from agreelens.ablation import resolve_chunk, sweep_chunks, sweep_model_shape
    from agreelens.model import default_device

    hsz, layers = sweep_model_shape(name)
    chunks = sweep_chunks(hsz, layers, resolve_chunk(params.scale.sweep_chunk, hsz, default_device()))
    n = min(params.scale.sweep_tasks or len(chunks), len(chunks))
    return [chunks[i * len(chunks) // n:(i + 1) * len(chunks) // n] for i in range(n)]


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def _gate_markdown(params: Params, suite: str, summary: dict | None, error: str | None = None) -> str:
    """The gate's markdown report (``reports/quality/<suite>.md``) where it was written, else a summary."""
    report = Path((summary or {}).get("report") or Path(params.quality.out) / f"{suite}.md")
    head = f"**{error}**\n\n" if error else ""
    if report.is_file():
        return head + report.read_text(encoding="utf-8")
    status = "FAILED" if error else "PASSED"
    rows = [(e.get("name"), "pass" if e.get("success") else "**FAIL**", e.get("observed", ""))
            for e in (summary or {}).get("expectations", [])]
    return f"# Quality gate `{suite}`: {status}\n\n{head}" + (_table(rows, ("expectation", "result", "observed"))
                                                              if rows else f"(no report at `{report}`)")


def _scalar_rows(d: dict, prefix: str = "") -> list[tuple]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _scalar_rows(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            rows.append((f"{prefix}{k}", f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v))
    return rows


def augment_markdown(mlm: dict, stats: dict) -> str:
    """Artifact: MLM fine-tuning and augmentation statistics, per-model training text."""
    per_model = stats.get("models") or {}
    parts = ["# BERT augmentation", "", "## Masked LM fine-tuning (`metrics/mlm.json`)", "",
             _table(_scalar_rows(mlm), ("statistic", "value")), "", "## Augmentation (`metrics/augment.json`)", "",
             _table(_scalar_rows({k: v for k, v in stats.items() if k != "models"}), ("statistic", "value"))]
    if per_model:
        cols = list(dict.fromkeys(c for m in per_model.values() for c in m))
        rows = [(name, *(f"{m.get(c, ''):,}" if isinstance(m.get(c), int) else m.get(c, "") for c in cols))
                for name, m in per_model.items()]
        parts += ["", "## Training text per model (original + synthetic)", "", _table(rows, ("model", *cols))]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------ flows


@flow(name="train")
def train_flow(params: Params) -> dict:
    out = {name: train_task(params, name) for name in params.model_names}  # one at a time: each uses every core
    rows = "\n".join(f"| {n} | {s['best_valid_ppl']} | {s['epochs']} | {s['tokens_per_second']} |" for n, s in out.items())
    create_markdown_artifact("| model | best valid PPL | epochs | tokens/s |\n|---|---:|---:|---:|\n" + rows,
                             key="train", description="training summary")
    return out


@flow(name="benchmark")
def benchmark_flow(params: Params) -> dict:
    """NA accuracy and BLiMP of every model (``metrics/na_<model>.json``): one task per model, submitted
    to the task runner (concurrent on Dask), in turn in the flow's process otherwise."""
    if params.scale.dask:
        futures = {name: evaluate_na_task.submit(params, name) for name in params.model_names}
        return {name: f.result() for name, f in futures.items()}
    return {name: evaluate_na_task(params, name) for name in params.model_names}


@flow(name="ablate")
def sweep_flow(params: Params) -> dict:
    """Every unit of every model ablated alone (``metrics/units_<model>.json``). With ``scale.dask`` each
    model's sweep is split into parts of whole passes (:func:`sweep_parts`), submitted as tasks and
    merged; the merge equals the serial sweep."""
    if not params.scale.dask:
        return {name: sweep_task(params, name) for name in params.model_names}
    t0 = time.perf_counter()
    futures = {name: [sweep_part_task.submit(params, name, i, part) for i, part in enumerate(sweep_parts(params, name))]
               for name in params.model_names}  # every part of every model in flight at once
    return {name: sweep_merge_task(params, name, [f.result() for f in fs], time.perf_counter() - t0)
            for name, fs in futures.items()}


@flow(name="probe")
def probe_flow(params: Params) -> dict:
    """The probing classifiers of every model (``metrics/probe_<model>.json``); the artifact has the
    held-out accuracies per construction (as fractions; ``agreelens probe`` prints the same as %)."""
    from agreelens.probe import verb_decoding

    out = {name: probe_task(params, name) for name in params.model_names}
    rows = []
    for name, r in out.items():
        best = verb_decoding(r)
        rows += [(name, cons, f"{v['accuracy']:.3f}",
                  *[f"{best[cons][k][0]:.3f} ({best[cons][k][1]})" if cons in best else "-" for k in ("before", "at")])
                 for cons, v in r["classifier"]["constructions"].items()]
    header = ("model", "construction", "(a) good vs bad", "(b) subject number before the verb", "(b) at the verb")
    create_markdown_artifact(_table(rows, header), key="probe", description="probing classifiers (held-out accuracy)")
    return out


@flow(name="register")
def register_flow(params: Params) -> dict:
    out = {name: register_task(params, name) for name in params.model_names}
    rows = "\n".join(f"| {d['name']} | {d['version']} | {d['alias']} | {d['reason']} |" for d in out.values())
    create_markdown_artifact("| model | version | alias | why |\n|---|---:|---|---|\n" + rows, key="registry",
                             description="registry decisions")
    return out


# ------------------------------------------------------------------------------------------ stages
# What the pipeline flow runs for each stage of the registry (agreelens/stages.py), which gives the order:
# the order of `dvc repro`. A step gets the settings and the run's result so far, and adds its own part.


def _prepare(params: Params, result: dict) -> None:
    restore_data()
    result["prepare"] = prepare_task(params)


def _gate(suite: str):
    def step(params: Params, result: dict) -> None:
        result.setdefault("quality", {})[suite] = quality_gate_task(params, suite)["success"]
    return step


def _finetune(params: Params, result: dict) -> None:
    result.setdefault("augment", {})["mlm"] = finetune_task(params)


def _augment(params: Params, result: dict) -> None:
    """Augmentation; the markdown artifact ``augmentation`` holds its and the MLM fine-tuning's statistics."""
    out = result.setdefault("augment", {})
    out["augment"] = augment_task(params)
    create_markdown_artifact(augment_markdown(out.get("mlm") or {}, out["augment"]), key="augmentation",
                             description="MLM fine-tuning and augmentation statistics")


def _benchmark(params: Params, result: dict) -> None:
    result["na"] = {name: r["accuracy"]
                    for name, r in _with_runner(benchmark_flow, task_runner(params))(params).items()}


def _calibrate(params: Params, result: dict) -> None:
    result["calibration"] = {name: calibrate_task(params, name) for name in params.model_names}


def _table6(params: Params, result: dict) -> None:
    result["table6"] = text = table6_task(params)
    create_markdown_artifact(text, key="table6", description="Table 6: perplexity and NA accuracy")


def _units(params: Params, result: dict) -> None:
    sweeps = result.get("sweep") or {}
    result["units"] = {name: {"number_units": [u["unit"] for u in (sweeps.get(name) or {}).get("number_units", [])],
                              "plotted": units_task(params, name)} for name in params.model_names}


def _report(params: Params, result: dict) -> None:
    result["report"] = report = report_task(params)
    create_markdown_artifact(Path(report).read_text(), key="report", description="agreelens report")


STEPS = {
    "prepare": _prepare,
    "stimuli": lambda params, result: result.update(stimuli=stimuli_task(params)),
    "natural": lambda params, result: result.update(natural=natural_task(params)),
    "checkbench": lambda params, result: result.update(checkbench=checkbench_task(params)),
    "validate_raw": _gate("raw"),
    "finetune_mlm": _finetune,
    "augment": _augment,
    "validate_augmented": _gate("augmented"),
    "parse": lambda params, result: result.setdefault("syntax", {}).update(parse=parse_task(params)),
    "augment_syntax": lambda params, result: result.setdefault("syntax", {}).update(
        augment=augment_syntax_task(params)),
    "validate_syntax": _gate("syntax"),
    "train": lambda params, result: result.update(train=train_flow(params)),
    "evaluate": lambda params, result: result.update(evaluate=evaluate_task(params)),
    "evaluate_na": _benchmark,
    "calibrate": _calibrate,  # before registration, as in dvc.yaml: never register a stale threshold
    "table6": _table6,
    "sweep": lambda params, result: result.update(sweep=_with_runner(sweep_flow, task_runner(params))(params)),
    "units": _units,
    "probe": lambda params, result: result.update(probe=probe_flow(params)),
    "report": _report,
    "register": lambda params, result: result.update(registry=register_flow(params)),
}


def stage_order(params: Params) -> list[str]:
    """The registry's stages (agreelens/stages.py) in the order this flow and ``dvc repro`` run them."""
    from agreelens.stages import declare

    names = [s.name for s in declare(params)]
    missing, extra = set(names) - set(STEPS), set(STEPS) - set(names)
    if missing or extra:
        raise RuntimeError(f"flows/pipeline.py STEPS and agreelens/stages.py disagree: stages without a step "
                           f"{sorted(missing)}, steps without a stage {sorted(extra)}")
    return names


@flow(name="agreelens-pipeline")
def pipeline(params_path: str = "params.yaml", profile: str | None = None, register: bool = False) -> dict:
    """Every stage of the registry, in its order (``register`` only with ``register``)."""
    setup_env()
    params = load_params(params_path, profile, env=False)
    if params.scale.dask and not get_current_settings().api.url:
        get_run_logger().warning("scale.dask is set but PREFECT_API_URL is not: Dask workers in other processes "
                                 "start temporary Prefect servers of their own; run `make services` and export "
                                 "PREFECT_API_URL (flows/README.md)")
    result: dict = {}
    for name in stage_order(params):
        if name != "register" or register:
            STEPS[name](params, result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--register", action="store_true", help="register the models in the MLflow registry")
    args = ap.parse_args()
    result = pipeline(args.params, args.profile, args.register)
    print(json.dumps({k: result[k] for k in ("quality", "na", "units", "registry") if k in result}, indent=1))


if __name__ == "__main__":
    main()
