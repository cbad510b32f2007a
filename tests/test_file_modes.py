"""Saved models and the JSON artifacts beside them are world-readable (0644 files, 0755 directories) whatever
the umask, so a service running as another user (the image's `agreelens`) can load them; a file it cannot read
is named in the error, with "permission denied" (safetensors alone reports it as missing).

"Another user" is simulated as root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (``setpriv``) reading
files owned by another uid: the kernel then checks the "other" permission bits, as for a non-root user."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from agreelens.config import ModelConfig
from agreelens.files import check_readable, publish_tree, write_text
from agreelens.model import RNNModel, load_model, save_model
from agreelens.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
OTHER_UID = 54321  # owns the copied files; the reading process is not this uid
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _tiny(tmp: Path) -> Path:
    torch.manual_seed(0)
    vocab = Vocab(["<eos>", "<unk>", "the", "boy", "boys", "likes", "like"])
    model = RNNModel(len(vocab), ModelConfig(emb_size=8, hidden_size=8, layers=1, dropout=0.0, softmax="full"))
    return save_model(model, vocab, tmp / "models" / "tiny")


@pytest.fixture()
def strict_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_save_model_is_world_readable_whatever_the_umask(tmp_path, strict_umask):
    out = _tiny(tmp_path)
    assert _mode(out) == 0o755
    assert {p.name: _mode(p) for p in out.iterdir()} == {"model.safetensors": 0o644, "config.json": 0o644,
                                                         "vocab.txt": 0o644}
    again = _tiny(tmp_path)  # over an existing model: same modes, no temporary directories left
    assert _mode(again) == 0o755 and _mode(again / "model.safetensors") == 0o644
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]
    assert load_model(again)[1].itos[-1] == "like"


def test_write_text_is_atomic_and_0644(tmp_path, strict_umask):
    p = write_text(tmp_path / "metrics" / "calibration_tiny.json", '{"threshold": 0.5}\n')
    assert _mode(p) == 0o644 and p.read_text() == '{"threshold": 0.5}\n'
    p.chmod(0o600)
    write_text(p, '{"threshold": 0.25}\n')
    assert _mode(p) == 0o644 and p.read_text() == '{"threshold": 0.25}\n'
    assert [q.name for q in p.parent.iterdir()] == ["calibration_tiny.json"]


def test_publish_tree_sets_0755_and_0644(tmp_path):
    d = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as a registry download starts
    (d / "sub").mkdir(mode=0o700)
    (d / "sub" / "model.safetensors").write_bytes(b"x")
    (d / "sub" / "model.safetensors").chmod(0o600)
    publish_tree(d)
    assert (_mode(d), _mode(d / "sub"), _mode(d / "sub" / "model.safetensors")) == (0o755, 0o755, 0o644)


def test_unreadable_file_is_named_with_permission_denied(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file; the root variant below drops the capability instead")
    out = _tiny(tmp_path)
    (out / "model.safetensors").chmod(0o200)  # the owner's read bit removed
    with pytest.raises(PermissionError, match=r"model\.safetensors: permission denied"):
        load_model(out)
    with pytest.raises(PermissionError, match=r"permission denied"):
        check_readable(out / "model.safetensors")


def _load_as_other(model_dir: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from agreelens.model import load_model; "
            "m, v = load_model(sys.argv[1]); print('loaded', len(v))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*NO_DAC, sys.executable, "-c", code, str(model_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def other_users_copy(tmp_path):
    """A function copying a model directory with its modes into a 0755 folder, owned by OTHER_UID."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to read as 'another user'")
    probe = tmp_path / "probe"
    probe.write_text("x")
    os.chown(probe, OTHER_UID, OTHER_UID)
    probe.chmod(0o600)
    if subprocess.run([*NO_DAC, "cat", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("dropping CAP_DAC_OVERRIDE does not take effect here")
    public = Path(tempfile.mkdtemp(prefix="agreelens-modes-"))
    public.chmod(0o755)

    def copy(src: Path) -> Path:
        dst = public / "models" / src.name
        shutil.copytree(src, dst)  # copy2: the modes travel, as with the image's COPY
        (public / "models").chmod(0o755)
        for p in [dst, *dst.iterdir()]:
            os.chown(p, OTHER_UID, OTHER_UID)
        return dst

    yield copy
    shutil.rmtree(public, ignore_errors=True)


def test_copied_model_loads_as_another_user(tmp_path, strict_umask, other_users_copy):
    dst = other_users_copy(_tiny(tmp_path))
    assert _mode(dst / "model.safetensors") == 0o644
    proc = _load_as_other(dst)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "loaded 7"


def test_model_another_user_cannot_read_names_the_file(tmp_path, other_users_copy):
    dst = other_users_copy(_tiny(tmp_path))
    (dst / "model.safetensors").chmod(0o600)  # what save_model used to leave (mkdtemp's 0700 directory)
    proc = _load_as_other(dst)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("PermissionError: ") and f"{dst / 'model.safetensors'}: permission denied" in last
    assert "mode 0600" in last and "No such file" not in proc.stderr
    dst.chmod(0o700)  # a directory the reader cannot enter
    proc = _load_as_other(dst)
    assert proc.returncode == 1 and f"{dst}: permission denied (directory mode 0700" in proc.stderr


def test_registry_download_is_world_readable(tmp_path, monkeypatch, strict_umask):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    from agreelens.registry import fetch, register

    mdir = _tiny(tmp_path)
    (tmp_path / "calibration_tiny.json").write_text('{"threshold": 0.25}')
    register(mdir, "agreelens-tiny", {"na_accuracy": 0.6, "test_ppl": 50},
             model_files={"calibration": tmp_path / "calibration_tiny.json"})
    local = fetch("models:/agreelens-tiny@champion")
    try:
        top = next(d for d in local.parents if d.name.startswith("agreelens-registry-"))
        assert _mode(top) == 0o755
        files = [p for p in top.rglob("*") if p.is_file()]
        dirs = [p for p in top.rglob("*") if p.is_dir()]
        assert any(p.name == "model.safetensors" for p in files) and any(p.name.startswith("calibration") for p in files)
        assert {_mode(p) for p in files} == {0o644} and {_mode(p) for p in dirs} == {0o755}
    finally:
        shutil.rmtree(next(d for d in local.parents if d.name.startswith("agreelens-registry-")), ignore_errors=True)
