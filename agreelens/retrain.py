"""Retraining when the corpora change (``agreelens schedule``; the Prefect flow is ``flows/schedule.py``).

The trigger compares two DVC hashes of ``data/``: the md5 of its *current content*, computed with DVC's
API as ``dvc commit`` would record it (:func:`data_hash`), and the ``data_dvc_md5`` tag of each registered
model's champion (every training run and registered version carries the md5 that ``data.dvc`` held).
A changed corpus file gives a different md5; then :func:`commit_data` records the new content in
``data.dvc`` (and DVC's cache), :func:`repro` runs ``dvc repro`` so that ``dvc.lock`` keeps the lineage;
its last stage registers the new models (:func:`registration` reads what it recorded). Nothing here imports Prefect.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from agreelens import tracking

log = logging.getLogger("agreelens")


class RetrainError(RuntimeError):
    """A DVC command of the retraining failed; the message holds the command and its output's tail."""


def data_hash(dvc_file: str | Path = "data.dvc", root: str | Path = ".") -> str:
    """The DVC md5 (``<md5>.dir``) of the current content of the folder that ``dvc_file`` tracks: what
    ``dvc commit`` would write into it. Reads only (DVC keeps its hash cache under ``.dvc/tmp``)."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    with Repo(str(root)) as repo:
        stage = repo.stage.collect(str(root / dvc_file))[0]
        return stage.outs[0].get_hash().value


def _tag(client, run_id: str | None, version) -> str | None:
    """``data_dvc_md5`` of a model version: its own tag, else its run's."""
    if (version.tags or {}).get("data_dvc_md5"):
        return version.tags["data_dvc_md5"]
    if not run_id:
        return None
    try:
        return client.get_run(run_id).data.tags.get("data_dvc_md5")
    except Exception:  # noqa: BLE001 - a deleted run: no evidence
        return None


def registered_hashes(params, models: list[str]) -> dict[str, dict]:
    """Per model: ``{"name", "champion": (version, md5) or None, "latest": (version, md5) or None}`` for the
    registered model ``<registry.prefix>-<model>``."""
    from mlflow import MlflowClient

    tracking.setup_env()
    client = MlflowClient()
    out = {}
    for model in models:
        name = f"{params.registry.prefix}-{model}"
        entry: dict = {"name": name, "champion": None, "latest": None}
        try:
            champ = client.get_model_version_by_alias(name, "champion")
            entry["champion"] = (str(champ.version), _tag(client, champ.run_id, champ))
        except Exception:  # noqa: BLE001 - no such model or no champion yet
            pass
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except Exception:  # noqa: BLE001
            versions = []
        if versions:
            last = max(versions, key=lambda v: int(v.version))
            entry["latest"] = (str(last.version), _tag(client, last.run_id, last))
        out[model] = entry
    return out


def decide(current: str, registered: dict[str, dict]) -> tuple[bool, str]:
    """``(retrain, reason)``: retrain unless every model's champion was trained on ``current``. A newer
    version trained on ``current`` that did not become champion also counts as done (its data is the
    current data: retraining would give the same model again)."""
    stale = []
    for model, r in registered.items():
        champ, last = r["champion"], r["latest"]
        if champ and champ[1] == current:
            continue
        if last and last[1] == current:
            continue
        stale.append(f"{r['name']} champion " + (f"v{champ[0]} md5 {champ[1]}" if champ else "none"))
    if stale:
        return True, f"corpora changed: data/ md5 {current} differs from " + "; ".join(stale)
    return False, f"corpora unchanged: data/ md5 {current} is what the registered models were trained on"


def _dvc(args: list[str], root: str | Path, env: dict | None = None) -> str:
    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = bin_dir + os.pathsep + full_env.get("PATH", "")  # the `agreelens` of this install
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RetrainError(f"`dvc {' '.join(args)}` failed ({proc.returncode}):\n{output[-4000:]}")
    return output


def commit_data(dvc_file: str | Path = "data.dvc", root: str | Path = ".") -> str:
    """Record the current content of the tracked folder in ``dvc_file`` (``dvc commit -f``) and DVC's cache;
    returns the md5 now in ``dvc_file``."""
    _dvc(["commit", "-f", str(dvc_file)], root)
    return tracking.dvc_hash(Path(root) / dvc_file)


def repro(root: str | Path = ".", profile: str | None = None) -> str:
    """``dvc repro`` in ``root``, which ends with the register stage (``metrics/register_<model>.json``).
    ``profile``: first written as the ``profile`` of ``root``'s params.yaml, the only switch the stages
    read (so dvc.lock records it). Returns DVC's output."""
    if profile:
        from agreelens.config import set_profile

        set_profile(Path(root) / "params.yaml", profile)
    return _dvc(["repro"], root)


def registration(name: str, since: float, root: str | Path = ".") -> dict | None:
    """What the register stage recorded for model ``name`` (``metrics/register_<name>.json``) if it was
    written at or after ``since`` (a ``time.time()``), else None."""
    import json

    path = Path(root) / "metrics" / f"register_{name}.json"
    if not path.is_file() or path.stat().st_mtime < since:
        return None
    return json.loads(path.read_text(encoding="utf-8"))
