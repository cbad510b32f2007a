"""A service that cannot load its model stops: `bentoml serve` exits with status 3 (EXIT_STARTUP_FAILED) within
seconds and its log names the file, instead of restarting the worker forever behind a port that never answers.

An unreadable file as root: the server runs without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (``setpriv``) and
the file belongs to another uid with mode 0600, so the kernel refuses it as it would to a non-root user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, stop_group
from tests.models import tiny_service_project

pytest.importorskip("bentoml")

EXIT_STARTUP_FAILED = 3
OTHER_UID = 54321
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _serve_until_exit(project: Path, prefix: list[str] = (), timeout: float = 60) -> tuple[int, float, str]:
    env = {**os.environ, "AGREELENS_PROJECT": str(project), "AGREELENS_SERVICE_MODEL": "tiny",
           "BENTOML_HOME": str(project / ".bentoml"), "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1"}
    for var in ("AGREELENS_PROFILE", "MLFLOW_TRACKING_URI", "AGREELENS_API_KEY", "AGREELENS_SERVER_PID"):
        env.pop(var, None)
    log_path = project / "serve.log"
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "bentoml", "serve", "services.service:AgreeLens",
                                 "--host", "127.0.0.1", "--port", str(free_port())],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop_group(proc.pid, timeout=20, proc=proc)
    out = log_path.read_text(errors="replace")
    assert rc is not None, f"bentoml serve still running after {timeout:.0f} s:\n{out[-3000:]}"
    return rc, time.monotonic() - t0, out


def _unreadable(path: Path) -> list[str]:
    """Make ``path`` unreadable for the server; returns the command prefix the server must run under."""
    if os.geteuid() != 0:
        path.chmod(0o200)
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv (util-linux): cannot make a file unreadable")
    os.chown(path, OTHER_UID, OTHER_UID)
    path.chmod(0o600)
    if subprocess.run([*NO_DAC, "cat", str(path)], capture_output=True).returncode == 0:
        pytest.skip("dropping CAP_DAC_OVERRIDE does not take effect here")
    return NO_DAC


@pytest.fixture()
def project(tmp_path) -> Path:
    tiny_service_project(tmp_path)
    return tmp_path


def test_unreadable_model_stops_the_server_naming_the_file(project):
    model = project / "models" / "tiny" / "model.safetensors"
    rc, seconds, out = _serve_until_exit(project, _unreadable(model))
    assert rc == EXIT_STARTUP_FAILED, out[-3000:]
    assert seconds < 30, f"exit after {seconds:.0f} s"
    assert f"the service cannot start: PermissionError: {model}: permission denied" in out
    assert "stopping the server, exit status 3" in out
    assert "No such file or directory" not in out


def test_corrupt_model_stops_the_server_naming_the_file(project):
    model = project / "models" / "tiny" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    rc, seconds, out = _serve_until_exit(project)
    assert rc == EXIT_STARTUP_FAILED, out[-3000:]
    assert f"the service cannot start: ValueError: {model}: cannot be read as safetensors" in out


def test_unreadable_calibration_stops_the_server_naming_the_file(project):
    cal = project / "models" / "tiny" / "calibration.json"
    rc, seconds, out = _serve_until_exit(project, _unreadable(cal))
    assert rc == EXIT_STARTUP_FAILED, out[-3000:]
    assert f"the service cannot start: PermissionError: [Errno 13] Permission denied: '{cal}'" in out
