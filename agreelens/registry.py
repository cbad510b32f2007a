"""MLflow Model Registry for the agreelens models: register with evidence, promote only a better model.

A registered version is an MLflow pyfunc whose artifact is the plain model directory (safetensors +
config + vocabulary, loaded with agreelens alone, tensors only) and whose ``predict`` scores minimal
pairs. Promotion rule: alias ``champion`` moves to the new version only when neither its NA accuracy (test
lexicon) nor its natural-text accuracy at >= 1 attractor (``natural/test.jsonl``) is lower than the
champion's by more than ``tolerance``, both scored on the same frozen evaluation set (tag ``eval_set``; a
champion registered on another set is scored again), and its test perplexity is under ``max_ppl``;
otherwise the version gets alias ``challenger`` and the reason is returned. ``models:/<name>@<alias>`` (or
``/<version>``) resolves to a local model directory through :func:`fetch`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc

from agreelens import tracking
from agreelens.files import DIR_MODE, publish_tree

PIP_REQUIREMENTS = ["torch==2.13.0", "safetensors>=0.4", "pyyaml>=6", "pydantic>=2", "numpy>=1.26"]


class AgreementModel(mlflow.pyfunc.PythonModel):
    """pyfunc: rows of BLiMP-style pairs in, per-pair margin log P(good) - log P(bad) out."""

    def load_context(self, context):
        from agreelens.model import load_model

        self.model, self.vocab = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        from agreelens.scoring import pair_margins

        records = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        margins, _ = pair_margins(self.model, self.vocab, records)
        return margins.tolist()


@dataclass
class Decision:
    name: str
    version: str
    alias: str  # champion or challenger
    reason: str
    champion: str | None = None  # the version that holds alias champion after this registration


def write_record(d: Decision, path: str | Path) -> Path:
    """``path`` (JSON): the registered name and version, its aliases, the champion's version, the reason and
    the URI to load it by (the register stage's output in ``dvc.yaml``)."""
    import json

    def num(v):
        return int(v) if v is not None and str(v).isdigit() else v

    champion = d.champion if d.champion is not None else (d.version if d.alias == "champion" else None)
    record = {"name": d.name, "version": num(d.version), "alias": d.alias, "aliases": [d.alias],
              "champion": num(champion), "reason": d.reason, "uri": f"models:/{d.name}/{d.version}"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _client():
    from mlflow import MlflowClient

    tracking.setup_env()
    return MlflowClient()


PROMOTION_METRICS = (("na_accuracy", "NA accuracy"), ("natural_attr", "natural-text accuracy at >= 1 attractor"))


def promotion(new: dict, champion: dict | None, tolerance: float, max_ppl: float) -> tuple[bool, str]:
    """``(promote, reason)`` from ``{"na_accuracy", "natural_attr", "test_ppl"}`` of the new version and the
    champion (scored on the same evaluation set): a metric both have may not drop by more than ``tolerance``."""
    if new["test_ppl"] > max_ppl:
        return False, f"test PPL {new['test_ppl']:.1f} is above the bound {max_ppl:g}"
    if champion is None:
        return True, "first version: no champion yet"
    shared = [(k, label) for k, label in PROMOTION_METRICS if k in new and k in champion]
    if not shared:
        return True, "no evaluation metric shared with the champion: the perplexity bound only"
    for key, label in shared:
        if new[key] < champion[key] - tolerance:
            return False, (f"{label} {new[key]:.2%} is below the champion's "
                           f"{champion[key]:.2%} by more than {tolerance:.2%}")
    return True, "; ".join(f"{label} {new[k]:.2%} vs champion {champion[k]:.2%}" for k, label in shared)


def eval_set_hash(files) -> str:
    """Identity of an evaluation set: a hash of its files' names and bytes (sorted)."""
    import hashlib

    h = hashlib.md5()
    for f in sorted(Path(x) for x in files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def register(model_dir: str | Path, name: str, metrics: dict, tags: dict | None = None,
             artifacts: list[str | Path] = (), tolerance: float = 0.01, max_ppl: float = 1e9,
             model_files: dict[str, str | Path] | None = None, rescore=None) -> Decision:
    """Log ``model_dir`` as a pyfunc in a new run, register it as ``name`` and set its alias.
    ``model_files``: more files that travel with the model (the checker's calibration, the number units).
    A champion whose ``eval_set`` tag differs from this version's is scored again with ``rescore(model_dir)
    -> metrics`` on the current evaluation set before the two are compared (without ``rescore``, only the
    perplexity bound applies), so versions are always compared on the same pairs."""
    tracking.setup_env()
    client = _client()
    mlflow.set_experiment("agreelens-registry")
    with mlflow.start_run(run_name=f"register {name}"):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.set_tags({**(tags or {}), "git_commit": tracking.git_commit(), "data_dvc_md5": tracking.dvc_hash()})
        for a in artifacts:
            if Path(a).exists():
                mlflow.log_artifact(str(a))
        info = mlflow.pyfunc.log_model(name="model", python_model=AgreementModel(),
                                       artifacts={"model_dir": str(model_dir),
                                                  **{k: str(v) for k, v in (model_files or {}).items()
                                                     if Path(v).is_file()}},
                                       pip_requirements=PIP_REQUIREMENTS,
                                       registered_model_name=name)
    version = str(info.registered_model_version)
    try:
        champ = client.get_model_version_by_alias(name, "champion")
        champ_run = client.get_run(champ.run_id).data
    except Exception:  # noqa: BLE001 - no champion yet
        champ, champ_run = None, None
    champ_metrics = None if champ_run is None else champ_run.metrics
    eval_set = (tags or {}).get("eval_set")
    if champ_run is not None and champ_run.tags.get("eval_set") != eval_set:
        try:
            champ_metrics = rescore(fetch(f"models:/{name}/{champ.version}")) if rescore else {}
        except (FileNotFoundError, ValueError):  # a champion without a loadable model: perplexity bound only
            champ_metrics = {}
    promote, reason = promotion(metrics, champ_metrics, tolerance, max_ppl)
    alias = "champion" if promote else "challenger"
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", reason)
    return Decision(name, version, alias, reason, version if promote else (str(champ.version) if champ else None))


def fetch(uri: str, dst: str | Path | None = None) -> Path:
    """``models:/name@alias`` or ``models:/name/version`` -> a local agreelens model directory."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri!r} is not a registry URI (models:/<name>@<alias> or models:/<name>/<version>)")
    tracking.setup_env()
    if not dst:
        dst = Path(tempfile.mkdtemp(prefix="agreelens-registry-"))
        os.chmod(dst, DIR_MODE)  # mkdtemp makes it 0700
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    publish_tree(local)  # 0755 / 0644: readable by other users, like a saved model
    found = sorted(local.rglob("model.safetensors"))
    if not found:
        raise FileNotFoundError(f"{uri}: the registered model holds no agreelens model directory")
    return found[0].parent


def register_model(params, name: str, metrics_dir: str | Path = "metrics", models_dir: str | Path = "models") -> Decision:
    """Register ``models/<name>`` as ``<registry.prefix>-<name>`` with the pipeline's metrics as evidence."""
    import json

    metrics_dir = Path(metrics_dir)
    try:
        ev = json.loads((metrics_dir / "eval.json").read_text())[name]
        na = json.loads((metrics_dir / f"na_{name}.json").read_text())
    except (OSError, KeyError, ValueError) as err:
        raise FileNotFoundError(f"no metrics for '{name}' in {metrics_dir}/ ({err}); run `dvc repro` first") from None
    metrics: dict = {}
    natural = na.get("natural", {}).get("test", {}).get("attractors", {})
    if any(k != "0" for k in natural):  # the frozen natural test set, items with >= 1 attractor
        gs = [g for k, g in natural.items() if k not in ("0", "2+")]
        metrics["natural_attr"] = sum(g["accuracy"] * g["n"] for g in gs) / max(1, sum(g["n"] for g in gs))
    metrics.update({"test_ppl": ev["test_ppl"], "na_accuracy": na["accuracy"],
               **{f"na_{k}": v["accuracy"] for k, v in na.get("constructions", {}).items()},
               **{f"na_{k.replace('/', '_')}": v["accuracy"] for k, v in na.get("groups", {}).items()}})
    if "blimp" in na:
        metrics["blimp_accuracy"] = na["blimp"]["accuracy"]
    units = metrics_dir / f"units_{name}.json"
    tags = {"number_units": ",".join(str(u["unit"]) for u in json.loads(units.read_text())["number_units"])} \
        if units.is_file() else {}
    eval_files = [*sorted(Path("stimuli").glob("*.jsonl")), Path(params.natural.out) / "test.jsonl"]
    tags.update({"augmented_dvc_md5": tracking.stage_out_hash("augment", params.augment.out),
                 "params_hash": tracking.params_hash(params.model_dump()),
                 "eval_set": eval_set_hash([f for f in eval_files if f.is_file()])})
    return register(Path(models_dir) / name, f"{params.registry.prefix}-{name}", metrics, tags,
                    artifacts=["reports/report.md", f"reports/figures/units_{name}.png"],
                    tolerance=params.registry.tolerance, max_ppl=params.registry.max_ppl,
                    model_files={"calibration": metrics_dir / f"calibration_{name}.json", "units": units},
                    rescore=lambda model_dir: _promotion_metrics(params, model_dir))


def _promotion_metrics(params, model_dir: Path) -> dict:
    """NA accuracy (test lexicon) and natural-text accuracy at >= 1 attractor of any model, on the current
    evaluation set: how a champion registered on another set is compared."""
    from agreelens.model import load_model
    from agreelens.scoring import read_pairs, score_pairs

    model, vocab = load_model(model_dir)
    na = score_pairs(model, vocab, read_pairs(sorted(Path("stimuli").glob("*.jsonl"))))
    nat = score_pairs(model, vocab, [p for p in read_pairs(Path(params.natural.out) / "test.jsonl")
                                     if p.get("n_attractors", 0) >= 1])
    return {"na_accuracy": na["accuracy"], "natural_attr": nat["accuracy"]}
