"""Scheduled retraining (`agreelens schedule --once`) in a temporary copy of the repository on the tiny
profile, against a real Prefect server: unchanged corpora log "corpora unchanged" and register nothing; a
changed corpus file changes data/'s DVC md5, so data.dvc is committed, `dvc repro` runs and a new model
version carrying the new md5 is registered."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

FAKE_CHAMPION = """
from pathlib import Path
from agreelens.registry import register
d = Path("fake-model"); d.mkdir(exist_ok=True); (d / "README").write_text("stand-in for a trained model\\n")
for name in ("agreelens-small", "agreelens-large"):
    print(register(d, name, {"test_ppl": 999.0, "na_accuracy": 0.0}).alias)
"""


def _sh(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _versions(project, env) -> dict:
    """``{registered name: [(version, data_dvc_md5 of its run), ...]}`` from the project's registry."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    return {m.name: sorted((str(v.version), c.get_run(v.run_id).data.tags.get("data_dvc_md5"))
                           for v in c.search_model_versions(f"name = '{m.name}'"))
            for m in c.search_registered_models()}


def _schedule(project, env):
    proc = subprocess.run([sys.executable, "-m", "agreelens.cli", "schedule", "--once"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    """A git repository with the working tree's files, data/ restored (data.dvc matches), profile tiny, and
    champions agreelens-small/-large registered with data.dvc's md5 (stand-ins: no training needed)."""
    dst = tmp_path_factory.mktemp("sched")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(src.read_bytes())
    env = {**os.environ, "PATH": f"{sys.executable.rsplit('/', 1)[0]}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "INFO", **prefect_server["env"]}
    env.pop("AGREELENS_PROFILE", None)
    raw = yaml.safe_load((dst / "params.yaml").read_text())
    raw["profile"] = "tiny"
    (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _sh(["git", "init", "-q"], dst, env)
    _sh(["git", "add", "-A"], dst, env)
    _sh(["git", "commit", "-qm", "clone"], dst, env)
    _sh([sys.executable, "-m", "agreelens.cli", "data"], dst, env)
    out = _sh([sys.executable, "-c", FAKE_CHAMPION], dst, env)
    assert out.startswith("champion\nchampion\n"), out
    return dst, env


def _md5(project) -> str:
    return yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def test_unchanged_corpora_register_nothing(project):
    dst, env = project
    before = _versions(dst, env)
    assert {k: len(v) for k, v in before.items()} == {"agreelens-small": 1, "agreelens-large": 1}
    assert before["agreelens-large"][0][1] == _md5(dst)  # the champion carries data.dvc's md5
    out = _schedule(dst, env)
    assert "corpora unchanged" in out
    assert _versions(dst, env) == before
    assert not (dst / "models" / "large").exists()  # nothing was trained


def test_changed_corpus_file_retrains_and_registers(project):
    dst, env = project
    old = _md5(dst)
    corpus = dst / "data" / "tatoeba" / "eng_union_uniq.txt"
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("The boys near the old school like their new teacher.\n")
    out = _schedule(dst, env)
    assert "corpora changed" in out and "corpora unchanged" not in out
    new = _md5(dst)
    assert new != old  # data.dvc was committed for the new content ...
    lock = yaml.safe_load((dst / "dvc.lock").read_text())
    prepare_deps = {d["path"]: d["md5"] for d in lock["stages"]["prepare"]["deps"]}
    assert prepare_deps["data"] == new  # ... and `dvc repro` recorded it as the pipeline's input
    assert (dst / "models" / "large" / "model.safetensors").is_file()
    after = _versions(dst, env)
    for name in ("agreelens-small", "agreelens-large"):
        assert after[name][-1] == ("2", new), after  # a new version, trained on the new corpora
    assert "agreelens-large version 2 -> @" in out
    # the next check finds nothing to do
    out = _schedule(dst, env)
    assert "corpora unchanged" in out and _versions(dst, env) == after


def test_schedule_serves_a_deployment_with_the_configured_cron(tmp_path, prefect_server):
    """`agreelens schedule` (no --once) serves the deployment on schedule.cron until stopped by PID."""
    import asyncio
    import time

    from tests.conftest import stop_group

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["schedule"] = {**raw.get("schedule", {}), "cron": "0 3 1 1 *"}  # 1 January, 03:00: no run during the test
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, **prefect_server["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agreelens.cli", "schedule"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    async def deployment():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            try:
                return await client.read_deployment_by_name("agreelens-retrain/agreelens-retrain")
            except Exception:  # noqa: BLE001 - not there yet
                return None

    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        found = None
        deadline = time.monotonic() + 120
        with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
            while found is None and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(1)
                found = asyncio.run(deployment())
        assert found is not None, log.read_text()[-3000:]
        assert [s.schedule.cron for s in found.schedules] == ["0 3 1 1 *"]
        assert found.parameters["root"] == str(tmp_path) and found.parameters["params_path"].endswith("params.yaml")
        assert "serving deployment agreelens-retrain" in log.read_text()
    finally:
        stop_group(proc.pid, proc=proc)
        proc.wait(timeout=10)
