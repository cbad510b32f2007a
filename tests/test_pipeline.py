"""One tiny end-to-end run of the whole DVC pipeline in a temporary copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _sh(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The working tree's files (tracked and untracked-not-ignored), in a fresh git repo."""
    dst = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _sh(["git", "init", "-q"], dst, env)
    _sh(["git", "add", "-A"], dst, env)
    _sh(["git", "commit", "-qm", "clone"], dst, env)
    return dst, env


def test_fresh_clone_restores_data_byte_identical_to_data_dvc(clone):
    dst, env = clone
    _sh([sys.executable, "-m", "agreelens.cli", "data"], dst, env)
    out = _sh(["dvc", "status", "data.dvc"], dst, env)
    assert "changed" not in out and "up to date" in out.lower(), out


def test_tiny_dvc_repro_end_to_end_then_noop(clone):
    dst, env = clone
    if not (dst / "data").exists():
        _sh([sys.executable, "-m", "agreelens.cli", "data"], dst, env)
    raw = yaml.safe_load((dst / "params.yaml").read_text())
    raw["profile"] = "tiny"
    (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    _sh(["dvc", "repro"], dst, env)
    ev = json.loads((dst / "metrics" / "eval.json").read_text())
    vocab = len((dst / "prepared" / "vocab.txt").read_text().splitlines())
    for name in ("small", "large"):
        assert (dst / "models" / name / "model.safetensors").is_file()
        assert 1 < ev[name]["test_ppl"] < vocab  # better than a uniform guess
    assert ev["small"]["train_tokens"] < ev["large"]["train_tokens"]
    assert (dst / "reports" / "figures" / "learning_curves.png").stat().st_size > 10_000
    prep = json.loads((dst / "metrics" / "prepare.json").read_text())
    assert set(prep["splits"]) == {"train", "valid", "test"}
    aug = json.loads((dst / "metrics" / "augment.json").read_text())  # BERT augmentation ran ...
    pairs = (dst / "augmented" / "pairs.tsv").read_text().splitlines()
    assert aug["kept"] == len(pairs) > 0 and aug["sources"] == 200
    for name in ("small", "large"):  # ... and each model trains on its original text + its synthetic share
        text = (dst / "augmented" / f"train_{name}.txt").read_text().splitlines()
        assert len(text) == prep["models"][name]["sentences"] + aug["models"][name]["synthetic"]
        syn = json.loads((dst / "metrics" / "syntax.json").read_text())["models"][name]  # + syntax-aware sentences
        trained = (dst / "syntax" / f"train_{name}.txt").read_text().splitlines()
        assert trained[: len(text)] == text and len(trained) == len(text) + syn["synthetic"]
        assert ev[name]["train_tokens"] == syn["tokens"] + len(trained)  # + one <eos> a sentence
    assert 0 < aug["models"]["small"]["synthetic"] < aug["models"]["large"]["synthetic"]
    assert json.loads((dst / "metrics" / "mlm.json").read_text())["steps"] == 2
    for suite in ("raw", "augmented"):  # the data-quality gates ran before training and passed
        assert (dst / "reports" / "quality" / f"{suite}.md").is_file()
    units = json.loads((dst / "metrics" / "units_large.json").read_text())
    assert len(units["drops"]) == 2 * units["hidden_size"]  # every unit of both layers swept
    probe = json.loads((dst / "metrics" / "probe_large.json").read_text())
    assert 0 <= probe["classifier"]["accuracy"] <= 1 and "nounpp" in probe["diagnostic"]
    t7 = json.loads((dst / "metrics" / "table7_large.json").read_text())
    assert t7["units"] and "full" in t7["accuracy"]
    report = (dst / "reports" / "report.md").read_text()
    assert "Table 6" in report and "Table 7 (large)" in report and "figures/units_small.png" in report
    assert "Probing classifiers" in report and "figures/probe_large.png" in report
    for fig in ("units_large", "saturation_small", "sweep_large", "probe_small"):
        assert (dst / "reports" / "figures" / f"{fig}.png").stat().st_size > 10_000

    start = time.perf_counter()
    out = _sh(["dvc", "repro"], dst, env)
    assert "up to date" in out.lower(), out  # second run is a no-op
    assert time.perf_counter() - start < 30
    table = _sh([sys.executable, "-m", "agreelens.cli", "report"], dst, env)
    assert "large" in table and "test PPL" in table
