"""The ablation sweep in parts (any split of its passes merges into the serial result, bit for bit) and
the flows' sweep and benchmark scoring on a Prefect DaskTaskRunner (LocalCluster, 2 workers of 1 thread)
against a real Prefect server: the merged Dask results equal the serial ones on a tiny model."""

from __future__ import annotations

import json

import pytest
import yaml

from agreelens.ablation import merge_sweep, resolve_chunk, sweep, sweep_chunks, sweep_part
from agreelens.model import save_model
from agreelens.stimuli import StimuliConfig, generate, write
from tests.models import H, random_lstm, stimuli_vocab

CHUNK = 3  # 8 units per layer: passes of 3, 3, 2 units in each layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def stim_cfg():
    return StimuliConfig(n_per_condition=5)


@pytest.fixture(scope="module")
def vocab(stim_cfg):
    return stimuli_vocab(stim_cfg, shuffle=True)


@pytest.fixture(scope="module")
def pairs(stim_cfg, vocab):
    return generate(stim_cfg, vocab)[0]


def _same(a: dict, b: dict) -> None:
    a, b = dict(a), dict(b)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_sweep_chunks_never_span_layers():
    chunks = sweep_chunks(H, 2, CHUNK)
    assert chunks == [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10, 11], [12, 13, 14], [15, 16]]
    assert sweep_chunks(H, 2, 32) == [list(range(1, 9)), list(range(9, 17))]


def test_chunk_zero_means_32_on_cpu_and_a_layer_up_to_256_on_cuda():
    assert resolve_chunk(5, 650, "cuda") == 5  # an explicit chunk is kept
    assert resolve_chunk(0, 650, "cpu") == 32
    assert resolve_chunk(0, 650, "cuda") == 256 and resolve_chunk(0, 200, "cuda") == 200
    assert sweep_chunks(200, 2, resolve_chunk(0, 200, "cuda")) == [list(range(1, 201)), list(range(201, 401))]


def test_parts_in_any_order_merge_to_the_serial_sweep(vocab, pairs):
    model = random_lstm(vocab, "adaptive", seed=1)
    serial = sweep(model, vocab, pairs, chunk=CHUNK, progress=False)
    chunks = sweep_chunks(H, 2, CHUNK)
    parts = [sweep_part(model, vocab, pairs, chunks[4:], full=False),
             sweep_part(model, vocab, pairs, chunks[:1], full=True),
             sweep_part(model, vocab, pairs, chunks[1:4], full=False)]
    _same(merge_sweep(parts, serial["threshold"]), serial)
    sub = sweep(model, vocab, pairs, constructions=["nounpp"], chunk=CHUNK, progress=False)
    _same(merge_sweep([sweep_part(model, vocab, pairs, chunks, constructions=["nounpp"])]), sub)
    with pytest.raises(ValueError, match="cover each unit once"):
        merge_sweep(parts[1:])
    with pytest.raises(ValueError, match="full model"):
        merge_sweep([parts[0], parts[2]])
    with pytest.raises(ValueError, match="one layer"):
        sweep_part(model, vocab, pairs, [[8, 9]])


@pytest.fixture()
def dask_project(tmp_path, monkeypatch, vocab, pairs):
    """Two tiny models (small, large), their stimuli and params.yaml asking for a 2-worker LocalCluster."""
    for seed, name in enumerate(("small", "large")):
        save_model(random_lstm(vocab, "adaptive", seed=seed + 1), vocab, tmp_path / "models" / name)
    write(pairs, tmp_path / "stimuli")
    raw = {"train": {"threads": 1}, "evaluate": {"batch_size": 8},
           "scale": {"dask": "local", "workers": 2, "threads_per_worker": 1, "processes": False,
                     "sweep_chunk": CHUNK, "sweep_tasks": 4}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _task_runs(flow_run_id) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_dask_sweep_and_benchmark_equal_serial(dask_project, prefect_api, vocab, pairs):
    from agreelens.config import load_params
    from agreelens.na import evaluate_na
    from flows.pipeline import benchmark_flow, sweep_flow, sweep_parts, task_runner

    params = load_params("params.yaml")
    parts = sweep_parts(params, "small")
    assert [sum(len(c) for c in p) for p in parts] == [3, 5, 3, 5]  # 6 passes of 3/3/2 units in 4 tasks
    serial = {name: sweep(random_lstm(vocab, "adaptive", seed=seed + 1), vocab, pairs, chunk=CHUNK, progress=False)
              for seed, name in enumerate(("small", "large"))}
    serial_na = {name: evaluate_na(params, name, out=dask_project / f"serial_na_{name}.json")
                 for name in ("small", "large")}

    runner = task_runner(params)
    assert type(runner).__name__ == "DaskTaskRunner"
    state = sweep_flow.with_options(task_runner=runner)(params, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    for name in ("small", "large"):
        written = json.loads((dask_project / "metrics" / f"units_{name}.json").read_text())
        _same(written, {"model": name, **serial[name]})
        _same(result[name], written)
        assert (dask_project / "reports" / "figures" / f"sweep_{name}.png").stat().st_size > 1000
    runs = _task_runs(state.state_details.flow_run_id)
    part_runs = [r for r in runs if r.name.startswith("sweep-small-part-")]
    assert len(part_runs) == 4 and all(r.state.is_completed() for r in part_runs)  # on the server, as tasks

    bench = benchmark_flow.with_options(task_runner=task_runner(params))(params)
    for name in ("small", "large"):
        assert bench[name] == serial_na[name]
        assert json.loads((dask_project / "metrics" / f"na_{name}.json").read_text()) == serial_na[name]


def test_scale_settings_are_checked():
    from agreelens.config import ParamsError, resolve

    with pytest.raises(ParamsError, match="scale.dask"):
        resolve({"scale": {"dask": "nowhere"}})
    assert resolve({"scale": {"dask": "tcp://127.0.0.1:8786"}}).scale.dask == "tcp://127.0.0.1:8786"
    assert resolve({}).scale.dask == ""
    with pytest.raises(ParamsError, match="schedule.cron"):
        resolve({"schedule": {"cron": "every day"}})
