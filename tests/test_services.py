"""`scripts/services.sh` (`make services` / `make services-stop`): MLflow and Prefect servers on loopback
in a temporary project folder, PIDs and logs under .services/, both APIs usable, stopped by PID."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def _alive_group(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_services_start_status_stop(tmp_path):
    ports = {"MLFLOW_PORT": str(free_port()), "PREFECT_PORT": str(free_port())}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(SERVICES_ROOT=str(tmp_path), VENV=str(ROOT / ".venv"), **ports)
    script = ["bash", str(ROOT / "scripts" / "services.sh")]

    def sh(*args, check=True):
        proc = subprocess.run([*script, *args], env=env, capture_output=True, text=True, timeout=300)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    pids: dict[str, int] = {}
    try:
        out = sh("start")
        assert f"http://127.0.0.1:{ports['MLFLOW_PORT']}" in out and f"http://127.0.0.1:{ports['PREFECT_PORT']}" in out
        pids = {n: int((tmp_path / ".services" / f"{n}.pid").read_text()) for n in ("mlflow", "prefect")}
        assert all(_alive_group(p) for p in pids.values())
        assert "already running" in sh("start")  # idempotent
        assert "mlflow running" in sh("status") and "prefect running" in sh("status")

        mlflow_url = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
        req = urllib.request.Request(f"{mlflow_url}/api/2.0/mlflow/experiments/search",
                                     data=json.dumps({"max_results": 10}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "Default" in r.read().decode()
        assert (tmp_path / "mlflow.db").is_file()  # the project's sqlite store
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['PREFECT_PORT']}/api/health", timeout=10) as r:
            assert r.status == 200
        assert (tmp_path / ".prefect").is_dir()
    finally:
        out = sh("stop", check=False)
    assert "mlflow stopped" in out and "prefect stopped" in out
    assert not any(_alive_group(p) for p in pids.values())
    assert not list((tmp_path / ".services").glob("*.pid"))
    assert "not running" in sh("stop")
