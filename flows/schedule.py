"""Scheduled retraining: a Prefect deployment that retrains and registers the models when the corpora change.

    agreelens schedule            # serve the deployment: every schedule.interval_minutes, or schedule.cron
    agreelens schedule --once     # one check now (cron users, tests)
    python flows/schedule.py [--once]

Each run of ``agreelens-retrain`` compares the DVC md5 of ``data/``'s current content with the
``data_dvc_md5`` tag of the champion of every model in ``schedule.models`` (:mod:`agreelens.retrain`).
Equal: it logs "corpora unchanged" and returns. Different: ``dvc commit data.dvc`` (data.dvc gets the
new md5), ``dvc repro`` (lineage in dvc.lock), whose register stage registers the models (champion or
challenger, as ``agreelens register``; a model whose stage did not run, its inputs unchanged, is registered
here). A markdown artifact ``retrain`` records the decision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreelens.config import Params, load_params  # noqa: E402
from agreelens.tracking import setup_env  # noqa: E402
from flows.pipeline import register_task  # noqa: E402

DEPLOYMENT = "agreelens-retrain"


@task
def data_hash_task() -> str:
    from agreelens.retrain import data_hash

    return data_hash("data.dvc")


@task(retries=2, retry_delay_seconds=5)  # I/O: the tracking/registry store
def registered_hashes_task(params: Params, models: list[str]) -> dict:
    from agreelens.retrain import registered_hashes

    return registered_hashes(params, models)


@task
def commit_data_task() -> str:
    from agreelens.retrain import commit_data

    return commit_data("data.dvc")


@task
def repro_task(profile: str | None) -> str:
    from agreelens.retrain import repro

    return repro(".", profile)


def _markdown(result: dict) -> str:
    lines = [f"# Retraining check: {'retrained' if result['retrained'] else 'nothing to do'}", "",
             result["reason"], "", f"- data/ md5 now: `{result['data_md5']}`"]
    for model, r in result["registered"].items():
        champ = f"v{r['champion'][0]} (`{r['champion'][1]}`)" if r["champion"] else "none"
        lines.append(f"- {r['name']}: champion {champ}")
    for d in (result.get("registry") or {}).values():
        lines.append(f"- registered {d['name']} v{d['version']} -> @{d['alias']}: {d['reason']}")
    return "\n".join(lines) + "\n"


@flow(name=DEPLOYMENT)
def retrain_flow(params_path: str = "params.yaml", profile: str | None = None, root: str = ".",
                 force: bool = False) -> dict:
    """Retrain (``dvc repro``) and register when ``data/`` differs from what the champions were trained on."""
    os.chdir(root)
    setup_env()
    logger = get_run_logger()
    params = load_params(params_path, profile, env=False)
    models = list(params.schedule.models or params.model_names)
    from agreelens.retrain import decide

    current = data_hash_task()
    registered = registered_hashes_task(params, models)
    retrain, reason = decide(current, registered)
    result = {"retrained": False, "data_md5": current, "reason": reason, "registered": registered}
    if not retrain and not force:
        logger.info(reason)
        create_markdown_artifact(_markdown(result), key="retrain", description="retraining check")
        return result
    logger.info("%s; retraining (dvc commit data.dvc, dvc repro)", reason if retrain else "forced")
    result["data_md5"] = commit_data_task()
    started = time.time()
    repro_task(profile)  # its register stage registers every model (metrics/register_<model>.json)
    from agreelens.retrain import registration

    result["registry"] = {m: registration(m, started) or register_task(params, m) for m in models}
    result["retrained"] = True
    for d in result["registry"].values():
        logger.info("registered %s version %s -> @%s: %s", d["name"], d["version"], d["alias"], d["reason"])
    create_markdown_artifact(_markdown(result), key="retrain", description="retraining check")
    return result


def serve(params_path: str = "params.yaml", profile: str | None = None) -> None:
    """Serve the deployment ``agreelens-retrain/agreelens-retrain`` on ``schedule.cron`` (if set) or every
    ``schedule.interval_minutes``, until interrupted. Needs a Prefect server (``make services``)."""
    params = load_params(params_path, profile)
    when = {"cron": params.schedule.cron} if params.schedule.cron else \
        {"interval": timedelta(minutes=params.schedule.interval_minutes)}
    retrain_flow.serve(name=DEPLOYMENT, parameters={"params_path": str(Path(params_path).resolve()),
                                                    "profile": profile, "root": str(Path.cwd())},
                       description="retrain and register when the DVC md5 of data/ changes", **when)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--once", action="store_true", help="check (and retrain) once, then exit")
    ap.add_argument("--force", action="store_true", help="with --once: retrain even when the corpora are unchanged")
    args = ap.parse_args()
    if args.once:
        result = retrain_flow(args.params, args.profile, force=args.force)
        print(json.dumps({k: result[k] for k in ("retrained", "reason", "data_md5", "registry") if k in result}))
    else:
        serve(args.params, args.profile)


if __name__ == "__main__":
    main()
