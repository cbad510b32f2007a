"""Data-parallel training (DDP under torchrun, 2 gloo processes on the CPU) against one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from agreelens.augment import run_augment
from agreelens.syntax import run_augment_syntax
from agreelens.config import load_params
from agreelens.corpus import prepare
from agreelens.distributed import World
from tests.conftest import free_port, run_cli


def _setup(project, dropout=0.0, **train):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["profile"] = "tiny"
    tiny = raw["profiles"]["tiny"]
    tiny["model"]["dropout"] = dropout
    tiny["train"].update({"amp": False, "na_stimuli": "", **train})
    tiny["augment"] = {"enabled": False}
    tiny["syntax"] = {"enabled": False}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(project / "params.yaml")
    prepare(params)
    run_augment(params, progress=False)
    run_augment_syntax(params)


def _torchrun(args, cwd, env=None, check=True):
    """``torchrun --nproc_per_node 2 -m agreelens <args>`` on a free port, 1 thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "agreelens", *args]
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def _clone(project, tmp_path_factory, name):
    other = tmp_path_factory.mktemp(name)
    for item in ("params.yaml", "prepared", "augmented", "syntax"):
        os.symlink(project / item, other / item)
    return other


def _weights(root, model="small"):
    return load_file(root / "models" / model / "model.safetensors")


def _curve(root, model="small"):
    rows = [r.split(",") for r in (root / "plots" / f"learning_{model}.csv").read_text().splitlines()]
    cols = rows[0]
    return [{c: float(v) for c, v in zip(cols, r) if c in ("step", "train_ppl", "valid_ppl")} for r in rows[1:]]


def test_two_gloo_processes_train_the_same_model_as_one(project, tmp_path_factory):
    # no dropout: both runs must compute the same updates; plain SGD without effective clipping, so that
    # a gradient summed over the ranks, or one rank's alone, would give other weights (Adam would hide it)
    _setup(project, max_steps=12, evals_per_epoch=40, checkpoint_every=100, optimizer="sgd", lr=2.0, clip=1e6,
           warmup_steps=0)
    ddp = _clone(project, tmp_path_factory, "ddp")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}

    run_cli(["train", "--model", "small"], cwd=project, env=env)
    out = run_cli(["train", "--model", "small", "--nproc", "2"], cwd=ddp, env=env)  # relaunches under torchrun
    assert out.stdout.count("best valid PPL") == 1  # rank 0 reports; rank 1 stays quiet

    one, two = _weights(project), _weights(ddp)
    assert one.keys() == two.keys()
    for k in one:  # same updates up to the order of floating-point sums
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), k
    c1, c2 = _curve(project), _curve(ddp)
    assert [r["step"] for r in c1] == [r["step"] for r in c2] and len(c1) >= 3
    assert c1[-1]["valid_ppl"] < c1[0]["valid_ppl"]  # the updates are real: the model learned
    for a, b in zip(c1, c2):  # the training loss is every rank's, the validation rank 0's
        assert a["train_ppl"] == pytest.approx(b["train_ppl"], rel=1e-4)
        assert a["valid_ppl"] == pytest.approx(b["valid_ppl"], rel=1e-4)
    m1 = json.loads((project / "metrics" / "train_small.json").read_text())
    m2 = json.loads((ddp / "metrics" / "train_small.json").read_text())
    assert m2["processes"] == 2 and "processes" not in m1 and m1["steps"] == m2["steps"] == 12


def test_ddp_resumes_after_kill_9_like_an_uninterrupted_ddp_run(project, tmp_path_factory):
    # dropout: each rank's own RNG stream must come back; one evaluation (at the end), so the checkpoints
    # carry a loss window summed over the ranks
    _setup(project, dropout=0.3, max_steps=12, evals_per_epoch=1, checkpoint_every=4)
    clean = _clone(project, tmp_path_factory, "clean")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}

    _torchrun(["train", "--model", "small"], cwd=clean, env=env)
    crashed = _torchrun(["train", "--model", "small"], cwd=project, env={**env, "AGREELENS_CRASH_AT_STEP": "7"},
                        check=False)
    assert crashed.returncode != 0
    ckpt = torch.load(project / "checkpoints" / "small" / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 4 and len(ckpt["rng"]["ranks"]) == 2
    assert not torch.equal(ckpt["rng"]["ranks"][0]["torch"], ckpt["rng"]["ranks"][1]["torch"])
    assert ckpt["hidden"][0].shape[1] == 16  # both ranks' columns: the whole batch
    assert ckpt["state"]["window_tokens"] == 4 * 16 * 20  # 4 steps x the whole batch x bptt, not one rank's
    resumed = _torchrun(["train", "--model", "small"], cwd=project, env=env)
    assert "resuming" in resumed.stdout + resumed.stderr

    a, b = _weights(clean), _weights(project)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curve(clean) == _curve(project) and len(_curve(project)) == 1


def test_world_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    w = World.from_env()
    assert (w.rank, w.size, w.main, w.distributed) == (0, 1, True, False)
    data = torch.arange(12).view(3, 4)
    assert torch.equal(w.shard(data), data) and w.sum(1.5, 2) == [1.5, 2]


def test_shard_takes_this_ranks_columns_and_rejects_uneven_batches():
    data = torch.arange(24).view(3, 8)
    assert World(rank=1, size=2).shard(data).tolist() == data[:, 4:].tolist()
    assert World(rank=0, size=4).shard(data).tolist() == data[:, :2].tolist()
    with pytest.raises(ValueError, match="divisible by the 3 DDP processes"):
        World(rank=0, size=3).shard(data)


def test_cli_refuses_nproc_that_does_not_divide_the_batch(project):
    _setup(project)
    out = run_cli(["train", "--model", "small", "--nproc", "3"], cwd=project, check=False)
    assert out.returncode == 1 and "not divisible by --nproc 3" in out.stderr
