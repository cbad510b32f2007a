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
