"""Prefect 3 flows: the study as observable, retried tasks over the same library functions that the
``agreelens`` commands in ``dvc.yaml`` call, writing the same outputs.

    python flows/pipeline.py [--profile tiny] [--register]

Flows: ``prepare_flow``, ``train_flow`` (small and large), ``evaluate_flow`` (test PPL, NA accuracy,
Table 6), ``inside_flow`` (sweep, Table 7 + figures, probes), ``register_flow`` (MLflow registry) and
``pipeline`` composing them. Each flow publishes a markdown artifact with its key results. Run in the
project folder (paths are the pipeline's). For lineage use ``dvc repro``: it runs the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreelens.config import Params, load_params  # noqa: E402
from agreelens.tracking import setup_env  # noqa: E402


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
def train_task(params: Params, name: str) -> dict:
    from agreelens.train import train

    return train(params, name, quiet=True)


@task
def evaluate_task(params: Params) -> dict:
    from agreelens.evaluate import evaluate

    return evaluate(params)


@task
def evaluate_na_task(params: Params, name: str) -> dict:
    from agreelens.na import evaluate_na

    return evaluate_na(params, name)


@task
def table6_task(params: Params) -> str:
    from agreelens.na import table6

    return table6(params.model_names)


@task
def sweep_task(params: Params, name: str) -> dict:
    from agreelens.ablation import run_sweep

    return run_sweep(params, name, progress=False)[0]


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


@task(retries=2, retry_delay_seconds=5)  # I/O: the tracking/registry store
def register_task(params: Params, name: str) -> dict:
    from agreelens.registry import register_model

    return vars(register_model(params, name))


@flow(name="prepare")
def prepare_flow(params: Params) -> dict:
    restore_data()
    stats = prepare_task(params)
    stimuli_task(params)
    return stats


@flow(name="train")
def train_flow(params: Params) -> dict:
    out = {name: train_task(params, name) for name in params.model_names}  # one at a time: each uses every core
    rows = "\n".join(f"| {n} | {s['best_valid_ppl']} | {s['epochs']} | {s['tokens_per_second']} |" for n, s in out.items())
    create_markdown_artifact("| model | best valid PPL | epochs | tokens/s |\n|---|---:|---:|---:|\n" + rows,
                             key="train", description="training summary")
    return out


@flow(name="evaluate")
def evaluate_flow(params: Params) -> dict:
    evaluate_task(params)
    na = {name: evaluate_na_task(params, name)["accuracy"] for name in params.model_names}
    text = table6_task(params)
    create_markdown_artifact(text, key="table6", description="Table 6: perplexity and NA accuracy")
    return na


@flow(name="inside")
def inside_flow(params: Params) -> dict:
    found = {}
    for name in params.model_names:
        sweep = sweep_task(params, name)
        found[name] = {"number_units": [u["unit"] for u in sweep["number_units"]], "plotted": units_task(params, name)}
        probe_task(params, name)
    report = report_task(params)
    create_markdown_artifact(Path(report).read_text(), key="report", description="agreelens report")
    return found


@flow(name="register")
def register_flow(params: Params) -> dict:
    out = {name: register_task(params, name) for name in params.model_names}
    rows = "\n".join(f"| {d['name']} | {d['version']} | {d['alias']} | {d['reason']} |" for d in out.values())
    create_markdown_artifact("| model | version | alias | why |\n|---|---:|---|---|\n" + rows, key="registry",
                             description="registry decisions")
    return out


@flow(name="agreelens-pipeline")
def pipeline(params_path: str = "params.yaml", profile: str | None = None, register: bool = False) -> dict:
    setup_env()
    params = load_params(params_path, profile)
    result = {"prepare": prepare_flow(params), "train": train_flow(params), "na": evaluate_flow(params),
              "units": inside_flow(params)}
    if register:
        result["registry"] = register_flow(params)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--register", action="store_true", help="register the models in the MLflow registry")
    args = ap.parse_args()
    result = pipeline(args.params, args.profile, args.register)
    print(json.dumps({k: result[k] for k in ("na", "units", "registry") if k in result}, indent=1))


if __name__ == "__main__":
    main()
