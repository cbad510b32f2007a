"""The stage registry (agreelens/stages.py): dvc.yaml is what it generates, its code dependencies come from
the import graph and tell DVC exactly which stages a changed module affects, the order is topological and
is the Prefect flow's, and DVC-run commands take the profile from params.yaml alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from agreelens import stages
from agreelens.config import load_params, set_profile
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def registry():
    return stages.registry(load_params(ROOT / "params.yaml", env=False))


def test_committed_dvc_yaml_is_the_generated_one():
    assert (ROOT / "dvc.yaml").read_text(encoding="utf-8") == stages.emit(ROOT / "params.yaml"), \
        "dvc.yaml differs from the stage registry: run `agreelens stages --emit`"


def test_order_is_topological_and_the_flows(registry):
    stages.check_order(registry)
    names = stages.order(registry)
    assert names[:2] == ["prepare", "stimuli"] and names[-2:] == ["register@small", "register@large"]
    assert names.index("train_small") < names.index("evaluate") < names.index("evaluate_na@small")
    pytest.importorskip("prefect")
    from flows.pipeline import STEPS, stage_order

    params = load_params(ROOT / "params.yaml", env=False)
    assert stage_order(params) == [s.name for s in registry] and set(STEPS) == {s.name for s in registry}


def test_order_check_catches_a_stage_before_its_input(registry):
    moved = [stages.find(registry, "train"), *[s for s in registry if s.name != "train"]]
    with pytest.raises(ValueError, match="train_small reads"):
        stages.check_order(moved)


def test_upstream_lists_exactly_what_a_stage_reads(registry):
    """The container test's tiny model runs these commands: the target and everything it reads, in order."""
    need = stages.upstream(registry, ["calibrate@large"])
    addrs = [a for a, _ in need]
    assert addrs == [a for a in stages.order(registry) if a in set(addrs)]  # run order kept
    assert {"prepare", "stimuli", "natural", "checkbench", "train_large", "calibrate@large"} <= set(addrs)
    assert not {"train_small", "evaluate", "calibrate@small", "sweep@large", "register@large"} & set(addrs)
    assert dict(need)["calibrate@large"] == "agreelens calibrate --model large"
    assert [a for a, _ in stages.upstream(registry, ["prepare"])] == ["prepare"]
    with pytest.raises(ValueError, match="no stage 'calibrate'; stages: prepare"):
        stages.upstream(registry, ["calibrate"])


def test_dvc_yaml_keeps_names_outputs_and_params(registry):
    dvc = yaml.safe_load(stages.dvc_yaml(registry))["stages"]
    assert list(dvc)[:4] == ["prepare", "stimuli", "natural", "checkbench"]
    assert dvc["evaluate_na"]["foreach"] == ["small", "large"]
    assert dvc["evaluate_na"]["do"]["metrics"] == [{"metrics/na_${item}.json": {"cache": False}}]
    assert dvc["train_large"]["cmd"] == "agreelens train --model large"
    assert dvc["train_large"]["plots"][0] == {"plots/learning_large.csv": {"cache": False, "x": "tokens", "y": "valid_ppl"}}
    assert dvc["register"]["do"]["cmd"] == "agreelens register --model ${item}"
    assert dvc["register"]["do"]["metrics"] == [{"metrics/register_${item}.json": {"cache": False}}]
    assert "agreelens/negatives.py" in dvc["train_small"]["deps"]  # the margin loss: imported by train
    assert "agreelens/negatives.py" not in dvc["prepare"]["deps"]
    assert all("agreelens/stages.py" not in (s.get("do") or s)["deps"] for s in dvc.values())


def test_code_deps_follow_top_level_and_function_imports(tmp_path):
    pkg = tmp_path / "agreelens"
    pkg.mkdir()
    files = {
        "cli.py": """
            import typer
            from agreelens.config import load
            app = typer.Typer()

            def _helper():
                from agreelens import shown

            @app.command("run-it")
            def run_it():
                from agreelens.impl import go
                _helper()

            @app.command()
            def other_cmd():
                import agreelens.other
            """,
        "config.py": "X = 1\n",
        "impl.py": """
            from typing import TYPE_CHECKING
            from agreelens.base import B
            if TYPE_CHECKING:
                from agreelens.typing_only import T
            def go():
                from agreelens.lazy import L
            """,
        "base.py": "B = 1\n", "lazy.py": "from agreelens.deep import D\n", "deep.py": "D = 1\n",
        "typing_only.py": "T = 1\n", "shown.py": "", "other.py": "", "unused.py": "",
        "stages.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    stages.import_graph.cache_clear()
    stages.entry_modules.cache_clear()
    assert stages.entry_modules("run-it", pkg) == ("config", "impl", "shown")
    assert stages.code_modules("run-it", pkg) == ["base", "config", "deep", "impl", "lazy", "shown"]
    assert stages.code_modules("other-cmd", pkg) == ["config", "other"]
    assert stages.code_deps("other-cmd", pkg) == ["agreelens/config.py", "agreelens/other.py"]
    with pytest.raises(KeyError, match="not a command"):
        stages.entry_modules("nope", pkg)


def test_training_fingerprint_hashes_the_train_stage_code(tmp_path, monkeypatch):
    from agreelens import train

    params = load_params(ROOT / "params.yaml", "tiny", env=False)
    for name in ("text.txt", "valid.txt", "vocab.txt"):
        (tmp_path / name).write_text("a b c\n")
    paths = train.Paths(prepared=tmp_path, train_text=tmp_path / "text.txt", model_dir=tmp_path / "m",
                        checkpoint=tmp_path / "last.pt", metrics=tmp_path / "m.json", curve=tmp_path / "c.csv")
    assert {f.stem for f in stages.code_files("train")} >= {"train", "model", "negatives", "lexicon", "vocab"}
    before = train._fingerprint(params, paths, "small")
    extra = tmp_path / "extra.py"
    extra.write_text("x = 1\n")
    files = stages.code_files("train")
    monkeypatch.setattr(stages, "code_files", lambda command: [*files, extra] if command == "train" else [])
    assert train._fingerprint(params, paths, "small") != before


def _placeholders(root: Path, registry) -> None:
    """Every data dependency and output of every stage as a small file (a name with a suffix) or a folder."""
    for s in registry:
        for _, model in s.instances():
            f = s.files(model)
            for rel in [*f["deps"], *f["outs"]]:
                path = root / rel
                if rel.startswith("agreelens/"):
                    continue
                if Path(rel).suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"{rel}\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text(f"{rel}\n")


def _dvc(args, cwd):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_touching_a_module_changes_exactly_the_stages_that_import_it(tmp_path, registry):
    """A copy of the project with placeholder data and a dvc.lock from `dvc commit` (no stage runs): after
    one module changes, `dvc status` lists exactly the stages whose code deps hold it; restored, none."""
    shutil.copytree(ROOT / "agreelens", tmp_path / "agreelens", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    _placeholders(tmp_path, registry)
    _dvc(["init", "--no-scm", "-q"], tmp_path)
    _dvc(["commit", "-f", "-q"], tmp_path)
    assert json.loads(_dvc(["status", "--json"], tmp_path) or "{}") == {}
    for module in ("negatives", "ablation"):
        expected = {addr for s in registry for addr, _ in s.instances() if f"agreelens/{module}.py" in s.code}
        assert expected and len(expected) < len(stages.order(registry))  # some stages, not all
        path = tmp_path / "agreelens" / f"{module}.py"
        original = path.read_bytes()
        path.write_bytes(original + b"\n# changed\n")
        status = json.loads(_dvc(["status", "--json"], tmp_path) or "{}")
        assert set(status) == expected, module
        for changes in status.values():
            assert changes == [{"changed deps": {f"agreelens/{module}.py": "modified"}}]
        path.write_bytes(original)
        assert json.loads(_dvc(["status", "--json"], tmp_path) or "{}") == {}


def test_dvc_commands_read_the_profile_from_params_yaml(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    monkeypatch.setenv("AGREELENS_PROFILE", "tiny")
    file_profile = yaml.safe_load(params.read_text())["profile"]
    assert load_params(params, env=False).profile == file_profile  # what the commands and the flows use
    assert load_params(params).profile == "tiny"  # the service may still take it from the environment
    from agreelens import cli

    assert cli._params(str(params), None).profile == file_profile
    assert cli._params(str(params), "paper").profile == "paper"  # --profile: this command alone


def test_set_profile_rewrites_the_key_only(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    before = params.read_text().splitlines()
    set_profile(params, "tiny")
    after = params.read_text().splitlines()
    assert [i for i, (a, b) in enumerate(zip(before, after)) if a != b] == \
        [next(i for i, line in enumerate(before) if line.startswith("profile:"))]
    assert load_params(params, env=False).profile == "tiny"
    from agreelens.config import ParamsError

    with pytest.raises(ParamsError, match="not defined"):
        set_profile(params, "nope")


def test_register_record(tmp_path):
    from agreelens.registry import Decision, write_record

    out = write_record(Decision("agreelens-large", "3", "challenger", "NA accuracy lower", "2"),
                       tmp_path / "metrics" / "register_large.json")
    assert json.loads(out.read_text()) == {"name": "agreelens-large", "version": 3, "alias": "challenger",
                                           "aliases": ["challenger"], "champion": 2, "reason": "NA accuracy lower",
                                           "uri": "models:/agreelens-large/3"}
    first = json.loads(write_record(Decision("agreelens-small", "1", "champion", "first"), tmp_path / "r.json")
                       .read_text())
    assert first["champion"] == 1 and first["aliases"] == ["champion"]
