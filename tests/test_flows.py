"""The Prefect pipeline flow on the tiny profile, in a temporary folder: the same outputs as `dvc repro`
(same library functions: quality gates, MLM fine-tuning and augmentation included), artifacts, and the
models registered with champion aliases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_prefect_pipeline_tiny_profile_end_to_end(tmp_path):
    pytest.importorskip("prefect")
    shutil.copytree(ROOT / "corpora", tmp_path / "corpora")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_API_URL": "",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "pipeline.py"), "--profile", "tiny", "--register"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert set(result["na"]) == {"small", "large"} and all(0 <= a <= 1 for a in result["na"].values())
    assert {d["alias"] for d in result["registry"].values()} == {"champion"}
    assert result["quality"] == {"raw": True, "augmented": True, "syntax": True}  # every gate ran and passed
    for path in ("reports/quality/raw.md", "reports/quality/augmented.md", "models/mlm/config.json",
                 "augmented/pairs.tsv", "augmented/train_large.txt", "metrics/augment.json", "metrics/eval.json",
                 "metrics/na_large.json", "metrics/units_small.json", "metrics/probe_large.json",
                 "reports/report.md", "models/large/model.safetensors", "reports/figures/units_large.png"):
        assert (tmp_path / path).is_file(), path
    na = json.loads((tmp_path / "metrics" / "na_large.json").read_text())
    assert na["accuracy"] == result["na"]["large"]  # the flow's result is the stage's output
