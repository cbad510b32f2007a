import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is fastest and spares a shared CPU from OpenMP spin-waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def restored_data(tmp_path_factory) -> Path:
    """The real corpora, restored from the committed archives into a temporary folder."""
    from agreelens.data import restore

    root = tmp_path_factory.mktemp("restored") / "data"
    restore(root, ROOT / "corpora")
    return root


@pytest.fixture()
def project(tmp_path, restored_data, monkeypatch) -> Path:
    """A temporary project folder with params.yaml and data/ (symlinked), cwd set to it."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data").symlink_to(restored_data, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def run_cli(args, cwd, env=None, check=True):
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "agreelens.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"agreelens {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc=None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if ``proc`` exits."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
    raise AssertionError(f"{url} did not come up in {timeout:.0f} s:\n{tail}")


def stop_group(pid: int, timeout: float = 20, proc=None) -> None:
    """SIGTERM the process group that ``pid`` leads (started with start_new_session), SIGKILL after ``timeout``;
    ``proc``: its Popen, reaped here (a zombie leader would keep the group alive)."""
    import signal
    import time

    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def serve_agreelens(project: Path, model: str, api_key: str | None = None, timeout: float = 180):
    """``bentoml serve services.service:AgreeLens`` on a free loopback port for the project folder
    ``project`` (AGREELENS_PROJECT; BENTOML_HOME and serve.log in it) serving ``model``, with the API key
    ``api_key`` (None: no key); no AGREELENS_PROFILE or MLFLOW_TRACKING_URI of this environment. Yields
    ``{"url", "log", "project"}`` once /readyz and a first /check answer 200; stops the process group."""
    import time

    import httpx

    env = {**os.environ, "AGREELENS_PROJECT": str(project), "AGREELENS_SERVICE_MODEL": model,
           "BENTOML_HOME": str(project / ".bentoml"), "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true",
           "OMP_NUM_THREADS": "1"}
    for var in ("AGREELENS_PROFILE", "MLFLOW_TRACKING_URI", "AGREELENS_API_KEY"):
        env.pop(var, None)
    if api_key is not None:
        env["AGREELENS_API_KEY"] = api_key
    headers = {"X-API-Key": api_key} if api_key is not None else {}
    port = free_port()
    log_path = project / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "services.service:AgreeLens",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    r = httpx.post(url + "/check", json={"text": "The boy likes it."}, headers=headers, timeout=30)
                    if r.status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready after {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "log": log_path, "project": project}
    finally:
        stop_group(proc.pid, timeout=30, proc=proc)  # the process group we started: bentoml and its workers
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real ``prefect server`` on a free loopback port, its state (sqlite) in a temporary PREFECT_HOME,
    telemetry and UI off; stopped by PID. Flows of the test process use it through ``prefect_api``,
    subprocesses through ``{"PREFECT_API_URL": url, "PREFECT_HOME": home}``: a real server, because
    temporary servers started per process leak across Dask workers."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true",
               PREFECT_LOGGING_LEVEL="WARNING")
    log = home / "server.log"
    with open(log, "w") as out:
        cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
               str(port), "--no-ui", "--analytics-off"]
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc, log)
        yield {"url": url, "home": home, "pid": proc.pid, "env": {"PREFECT_API_URL": url, "PREFECT_HOME": str(home)}}
    finally:
        try:  # send this process's buffered flow/task logs while the server is still up
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        stop_group(proc.pid, proc=proc)
        proc.wait(timeout=10)


@pytest.fixture()
def prefect_api(prefect_server):
    """Flows run in this test process report to the ``prefect_server``."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"], PREFECT_HOME: prefect_server["home"]}):
        yield prefect_server["url"]
