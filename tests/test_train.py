import json
from collections import Counter
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from agreelens.augment import run_augment
from agreelens.syntax import run_augment_syntax
from agreelens.config import Params, load_params
from agreelens.corpus import prepare
from agreelens.train import SentenceStream, autocast_dtype, batchify, train
from agreelens.vocab import Vocab
from tests.conftest import run_cli


def test_batchify_makes_contiguous_streams():
    data = batchify(torch.arange(10), 3)
    assert data.shape == (3, 3)
    assert data[:, 0].tolist() == [0, 1, 2] and data[:, 2].tolist() == [6, 7, 8]


def test_epoch_order_is_a_seeded_permutation_of_whole_sentences():
    vocab = Vocab(["<eos>", "<unk>", "a", "b", "c"])
    lines = ["a b", "c", "a a a", "b c a b", "c c"]
    stream = SentenceStream(vocab, lines)
    def epoch(e: int, shuffle: bool = True):
        return torch.from_numpy(stream.ids[stream.positions(7, e, shuffle)])

    e0, e0b, e1 = epoch(0), epoch(0), epoch(1)
    assert torch.equal(e0, e0b) and not torch.equal(e0, e1)

    def sentences(ids):
        out, cur = [], []
        for i in ids.tolist():
            if i == vocab.eos:
                out.append(" ".join(vocab.itos[j] for j in cur))
                cur = []
            else:
                cur.append(i)
        return out

    assert sorted(sentences(e1)) == sorted(lines)
    assert sentences(epoch(0, shuffle=False)) == lines


def test_attractor_weights_follow_their_tokens_through_the_shuffle():
    from agreelens.train import _agreement_swap

    vocab = Vocab("<eos> <unk> the boy boys car cars near sings sing is are he they".split())
    lines = ["the boy near the cars sings", "he sings", "they sing", "the boys near the car are", "the boy is"] * 5
    stream = SentenceStream(vocab, lines)
    def weighted(w: float) -> Params:
        base = Params()
        return base.model_copy(update={"train": base.train.model_copy(update={"attractor_weight": w})})

    params = weighted(4.0)
    swap, pairs, weights, counts = _agreement_swap(params, vocab, lines, stream, quiet=True)
    assert counts == {"agreement_pairs": 2}
    assert pairs == [("is", "are"), ("sings", "sing")] and weights.shape == (stream.tokens,)
    order = stream.positions(7, 1, True)
    ids, w = stream.ids[order], weights[order]
    assert sorted(vocab.itos[i] for i in ids[w == 4.0]) == ["are"] * 5 + ["sings"] * 5
    assert set(w.tolist()) == {1.0, 4.0}
    assert _agreement_swap(weighted(1.0), vocab, lines, stream, quiet=True)[2] is None  # weight 1: no per-token weights


def test_noun_weight_puts_the_margin_on_nouns_after_a_determiner_only():
    from agreelens.train import _agreement_swap

    vocab = Vocab("<eos> <unk> the a these boy boys book books car cars near sings sing he they".split())
    lines = ["these books near the car sing", "a book sings", "the books sing", "these book cars sing",
             "these boys sing", "he sings", "they sing"] * 5
    stream = SentenceStream(vocab, lines)
    base = Params()
    params = base.model_copy(update={"train": base.train.model_copy(update={"attractor_weight": 1.0, "noun_weight": 2.0})})
    swap, pairs, weights, counts = _agreement_swap(params, vocab, lines, stream, quiet=True)
    assert pairs == [("sings", "sing")] and swap[vocab.index("books")] == vocab.index("book")
    margin = Counter((vocab.itos[t], float(w)) for t, w in zip(stream.ids, weights) if w and swap[t] >= 0)
    # "these books" and "a book" carry 2, every verb 1; "the books", "these book cars" (a compound), "the car"
    # and "these boys" carry nothing (boy/boys and car/cars are NA-task nouns: held out)
    assert margin == {("books", 2.0): 5, ("book", 2.0): 5, ("sings", 1.0): 10, ("sing", 1.0): 25}
    assert counts == {"agreement_pairs": 1, "noun_pairs": 1, "noun_sites": 10}


def _tiny(project, **train_overrides):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["profile"] = "tiny"
    raw["profiles"]["tiny"]["train"].update(train_overrides)
    raw["profiles"]["tiny"]["augment"] = {"enabled": False}  # the original text only: no masked LM needed
    raw["profiles"]["tiny"]["syntax"] = {"enabled": False}  # ... and no parser
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(project / "params.yaml")
    prepare(params)
    run_augment(params, progress=False)
    run_augment_syntax(params)
    return params


def test_tiny_training_lowers_perplexity(project):
    params = _tiny(project, max_steps=60, evals_per_epoch=40, lr=0.01)
    summary = train(params, "large", quiet=True)
    curve = [json.loads(json.dumps(h)) for h in (project / "plots" / "learning_large.csv").read_text().splitlines()[1:]]
    valid = [float(row.split(",")[4]) for row in curve]
    vocab_size = len((project / "prepared" / "vocab.txt").read_text().splitlines())
    assert len(valid) >= 2 and valid[-1] < valid[0] < vocab_size  # learned something beyond uniform
    assert summary["best_valid_ppl"] == pytest.approx(min(valid), rel=1e-3)
    assert (project / "models" / "large" / "model.safetensors").is_file()
    assert not (project / "checkpoints" / "large" / "last.pt").exists()  # cleaned up after success


def test_resume_after_kill_9_ends_identical_to_uninterrupted(project, tmp_path_factory):
    _tiny(project, max_steps=30, checkpoint_every=10, evals_per_epoch=40, number_loss=1.0)  # its readout resumes too
    clean = tmp_path_factory.mktemp("clean")
    for item in ("params.yaml", "prepared", "augmented", "syntax"):
        os.symlink(project / item, clean / item)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}

    run_cli(["train", "--model", "small"], cwd=clean, env=env)
    crashed = run_cli(["train", "--model", "small"], cwd=project, env={**env, "AGREELENS_CRASH_AT_STEP": "17"},
                      check=False)
    assert crashed.returncode == -9  # killed by SIGKILL mid-run, between checkpoints
    ckpt = torch.load(project / "checkpoints" / "small" / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 10  # the last checkpoint before the kill
    assert not (project / "models" / "small").exists()  # nothing half-written
    resumed = run_cli(["train", "--model", "small"], cwd=project, env=env)
    assert "resuming" in resumed.stdout + resumed.stderr

    a = load_file(clean / "models" / "small" / "model.safetensors")
    b = load_file(project / "models" / "small" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((clean / "metrics" / "train_small.json").read_text())
    mb = json.loads((project / "metrics" / "train_small.json").read_text())
    assert ma["best_valid_ppl"] == mb["best_valid_ppl"] and ma["steps"] == mb["steps"] == 30

    def curve(root):  # the learning curve without its wall-clock column
        rows = [line.split(",") for line in (root / "plots" / "learning_small.csv").read_text().splitlines()]
        drop = rows[0].index("seconds")
        return [r[:drop] + r[drop + 1:] for r in rows]

    assert curve(clean) == curve(project) and len(curve(project)) > 3


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                         (False, False, None)])
def test_cpu_bf16_only_where_the_hardware_has_it(monkeypatch, avx512_bf16, amx, expected):
    # oneDNN reports bf16 support on every AVX-512 CPU (emulated, slower than fp32): fp32 there
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert autocast_dtype(torch.device("cpu")) is expected
