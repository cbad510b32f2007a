"""MLflow and lineage helpers: tool state inside the project, telemetry off, tags for every run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import warnings
from pathlib import Path

import yaml

log = logging.getLogger("agreelens")

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def setup_env(project: str | Path = ".") -> None:
    """Telemetry off; MLflow/Prefect/BentoML state under the project unless the user set it."""
    project = Path(project).resolve()
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    os.environ.setdefault("PREFECT_HOME", str(project / ".prefect"))
    os.environ.setdefault("BENTOML_HOME", str(project / ".bentoml"))


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_hash(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 that ``data.dvc`` records for ``data/`` (what a retrain trigger compares)."""
    try:
        meta = yaml.safe_load(Path(dvc_file).read_text())
        return meta["outs"][0]["md5"]
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unknown"


def stage_out_hash(stage: str, path: str, lock: str | Path = "dvc.lock") -> str:
    """The md5 that ``dvc.lock`` records for output ``path`` of ``stage`` (e.g. the augmented text)."""
    try:
        outs = yaml.safe_load(Path(lock).read_text())["stages"][stage]["outs"]
        return next(o["md5"] for o in outs if o["path"] == path)
    except (OSError, KeyError, TypeError, StopIteration, yaml.YAMLError):
        return "unknown"


def params_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Run:
    """A thin, failure-tolerant MLflow run: a broken tracking store warns, never kills training."""

    def __init__(self, mlflow_run=None):
        self._run = mlflow_run
        self.id = mlflow_run.info.run_id if mlflow_run else None

    def _call(self, fn, *args, **kwargs):
        if self._run is None:
            return
        try:
            import mlflow

            getattr(mlflow, fn)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must not stop a training run
            log.warning("MLflow %s failed: %s", fn, err)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._call("log_metrics", {k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if Path(path).exists():
            self._call("log_artifact", str(path))

    def set_tags(self, tags: dict) -> None:
        self._call("set_tags", tags)


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str, params: dict, tags: dict, run_id: str | None = None):
    """Start (or resume, by ``run_id``) an MLflow run; yields a :class:`Run`."""
    setup_env()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlflow

            mlflow.set_experiment(experiment)
            active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
            if not run_id:
                mlflow.log_params(params)
                mlflow.set_tags(tags)
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow unavailable (%s); this run is not tracked", err)
        yield Run(None)
        return
    status = "FAILED"
    try:
        yield Run(active)
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
