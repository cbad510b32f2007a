"""Typed settings loaded from ``params.yaml`` (the one source of truth).

``params.yaml`` holds one section per pipeline stage (``data``, ``prepare``, ``model``, ``train``,
``evaluate``) plus named ``profiles`` that override them. The key ``profile`` picks one; the
``default`` profile is the sections as written. The CLI, the flows, the service and ``dvc.yaml`` all
read settings through :func:`load_params`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agreelens.stimuli import StimuliConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    root: str = "data"
    corpora: list[Literal["tatoeba", "onestopenglish", "wikitext2"]] = ["tatoeba", "onestopenglish"]
    # cap on sentences read per corpus (0 = all); the tiny test profile uses it
    max_sentences: int = Field(0, ge=0)


class PrepareConfig(_Section):
    out: str = "prepared"
    seed: int = 1
    valid_frac: float = Field(0.05, gt=0, lt=0.5)
    test_frac: float = Field(0.05, gt=0, lt=0.5)
    min_count: int = Field(2, ge=1)
    max_vocab: int = Field(20000, ge=10)
    max_sentence_tokens: int = Field(80, ge=3)
    # fraction of the training split each model sees; small/large as in the paper (52.5 / 102.5 M)
    sizes: dict[str, float] = {"small": 0.512, "large": 1.0}

    @field_validator("sizes")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        for name, frac in v.items():
            if not 0 < frac <= 1:
                raise ValueError(f"sizes.{name} must be in (0, 1], got {frac}")
        return v


class ModelConfig(_Section):
    emb_size: int = Field(650, ge=1)
    hidden_size: int = Field(650, ge=1)
    layers: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    # "full": the paper's linear decoder + softmax; "adaptive": torch's AdaptiveLogSoftmaxWithLoss
    softmax: Literal["full", "adaptive"] = "full"
    cutoffs: list[int] = [2000, 10000]
    div_value: float = 4.0


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1)
    bptt: int = Field(35, ge=2)
    epochs: int = Field(40, ge=1)
    max_steps: int = Field(0, ge=0)  # 0 = no cap; otherwise stop after this many updates
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(20.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_steps: int = Field(0, ge=0)
    plateau_factor: float = Field(0.25, gt=0, le=1)
    clip: float = Field(0.25, gt=0)
    patience: int = Field(3, ge=1)  # early stop after this many evaluations without improvement
    evals_per_epoch: int = Field(1, ge=1)
    checkpoint_every: int = Field(200, ge=1)  # steps
    seed: int = 1111
    threads: int = Field(0, ge=0)  # 0 = all cores
    amp: bool = True  # bf16 mixed precision where the hardware does it natively (CUDA, AVX512-BF16 CPUs)
    shuffle: bool = True  # reshuffle sentence order every epoch
    na_stimuli: str = "stimuli"  # score these NA pairs at every validation ("" = off): agreement curve


class EvaluateConfig(_Section):
    batch_size: int = Field(64, ge=1)


class AnalysisConfig(_Section):
    """Stages ``sweep``, ``units`` and ``probe``: number units, the paper's Figures 2-3, gate saturation,
    probing classifiers."""

    sweep_constructions: list[str] = []  # [] = all constructions of the stimuli
    threshold: float = Field(10.0, gt=0, le=100)  # accuracy drop (points) that makes a number unit
    top_units: int = Field(2, ge=0)  # plot the sweep's top units ...
    units: list[int] = []  # ... and these (paper numbering: 1..H layer 1, H+1..2H layer 2)
    saturation_tokens: int = Field(30000, ge=100)  # validation tokens for the gate-saturation figure
    probe_heldout: float = Field(0.25, gt=0, lt=1)  # share of each construction's pairs held out by the probes
    probe_steps: int = Field(300, ge=1)  # full-batch Adam steps of each probe
    probe_seed: int = 1  # seeds the pair-level train / held-out split


class RegistryConfig(_Section):
    """Stage ``register``: MLflow Model Registry names and the promotion rule."""

    prefix: str = "agreelens"  # registered names: <prefix>-small, <prefix>-large
    tolerance: float = Field(0.01, ge=0, le=1)  # champion moves unless NA accuracy drops more than this
    max_ppl: float = Field(1000.0, gt=0)  # and only when test perplexity is under this bound


class Params(_Section):
    profile: str = "default"
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    stimuli: StimuliConfig = StimuliConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    registry: RegistryConfig = RegistryConfig()

    @property
    def model_names(self) -> list[str]:
        return list(self.prepare.sizes)


class ParamsError(ValueError):
    """params.yaml is missing or wrong; the message names the file and the field."""


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(raw: dict, profile: str | None = None, source: str = "params.yaml") -> Params:
    """Apply the chosen profile's overrides to the base sections and validate."""
    raw = dict(raw or {})
    profiles = raw.pop("profiles", {}) or {}
    chosen = profile or os.environ.get("AGREELENS_PROFILE") or raw.get("profile", "default")
    if chosen != "default":
        if chosen not in profiles:
            known = ", ".join(["default", *profiles]) or "default"
            raise ParamsError(f"{source}: profile '{chosen}' is not defined (known: {known})")
        raw = _merge(raw, profiles[chosen])
    raw["profile"] = chosen
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = [f"{source}: invalid settings for profile '{chosen}':"]
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {field}: {e['msg']}")
        raise ParamsError("\n".join(lines)) from None


def load_params(path: str | os.PathLike = "params.yaml", profile: str | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return resolve(raw, profile, source=str(path))
