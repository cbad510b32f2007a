"""MLflow registry: promotion rule with known answers, and a real tiny registry (sqlite in tmp)."""

from __future__ import annotations

import json

import torch

from agreelens.registry import promotion


def test_promotion_rule():
    assert promotion({"na_accuracy": 0.6, "test_ppl": 40}, None, 0.01, 100) == (True, "first version: no champion yet")
    assert promotion({"na_accuracy": 0.595, "test_ppl": 40}, {"na_accuracy": 0.6}, 0.01, 100)[0]  # within tolerance
    ok, why = promotion({"na_accuracy": 0.55, "test_ppl": 40}, {"na_accuracy": 0.6}, 0.01, 100)
    assert not ok and "below the champion" in why
    ok, why = promotion({"na_accuracy": 0.9, "test_ppl": 400}, {"na_accuracy": 0.6}, 0.01, 100)
    assert not ok and "above the bound" in why


def test_register_promote_and_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    from agreelens.config import ModelConfig
    from agreelens.model import RNNModel, load_model, save_model
    from agreelens.registry import fetch, register
    from agreelens.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab(["<eos>", "<unk>", "the", "boy", "boys", "likes", "like"])
    model = RNNModel(len(vocab), ModelConfig(emb_size=8, hidden_size=8, layers=2, dropout=0.0, softmax="full"))
    mdir = save_model(model, vocab, tmp_path / "models" / "tiny")
    first = register(mdir, "agreelens-tiny", {"na_accuracy": 0.6, "test_ppl": 50})
    worse = register(mdir, "agreelens-tiny", {"na_accuracy": 0.5, "test_ppl": 50}, tolerance=0.01)
    better = register(mdir, "agreelens-tiny", {"na_accuracy": 0.7, "test_ppl": 45})
    assert (first.alias, worse.alias, better.alias) == ("champion", "challenger", "champion")
    assert "below the champion" in worse.reason and better.version == "3"
    local = fetch("models:/agreelens-tiny@champion", tmp_path / "dl")
    m2, v2 = load_model(local)
    x = torch.tensor([[0], [2], [3]])
    assert torch.equal(model.eval()(x)[0], m2(x)[0]) and v2.itos == vocab.itos

    from agreelens.checker import find_calibration, load_units  # the checker's files travel with the model
    (tmp_path / "calibration_tiny.json").write_text('{"threshold": 0.25}')
    (tmp_path / "units_tiny.json").write_text('{"number_units": [{"unit": 12}, {"unit": 3}]}')
    register(mdir, "agreelens-tiny", {"na_accuracy": 0.8, "test_ppl": 40},
             model_files={"calibration": tmp_path / "calibration_tiny.json", "units": tmp_path / "units_tiny.json"})
    shipped = fetch("models:/agreelens-tiny@champion")  # a fresh download, as the service does
    assert json.loads(find_calibration(shipped, "tiny", tmp_path / "nowhere").read_text())["threshold"] == 0.25
    assert load_units("tiny", tmp_path / "nowhere", model_dir=shipped) == [12, 3]


def test_pyfunc_predict_and_score_by_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    import mlflow.pyfunc
    import pandas as pd

    from agreelens.config import ModelConfig
    from agreelens.model import RNNModel, save_model
    from agreelens.na import resolve_model
    from agreelens.registry import register
    from agreelens.scoring import pair_margins
    from agreelens.vocab import Vocab

    torch.manual_seed(1)
    vocab = Vocab(["<eos>", "<unk>", "the", "boy", "boys", "likes", "like"])
    model = RNNModel(len(vocab), ModelConfig(emb_size=8, hidden_size=8, layers=2, dropout=0.0, softmax="full")).eval()
    mdir = save_model(model, vocab, tmp_path / "m")
    register(mdir, "agreelens-t", {"na_accuracy": 0.5, "test_ppl": 10})
    pairs = [{"sentence_good": "the boy likes", "sentence_bad": "the boy like", "UID": "x", "pairID": "0",
              "one_prefix_prefix": "the boy", "one_prefix_word_good": "likes", "one_prefix_word_bad": "like"},
             {"sentence_good": "the boys like", "sentence_bad": "the boys likes", "UID": "x", "pairID": "1"}]
    want, _ = pair_margins(model, vocab, pairs)
    got = mlflow.pyfunc.load_model("models:/agreelens-t@champion").predict(pd.DataFrame(pairs))
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), want, atol=1e-9)
    assert (resolve_model("models:/agreelens-t@champion") / "model.safetensors").is_file()


def test_stage_out_hash_reads_dvc_lock(tmp_path):
    from agreelens.tracking import stage_out_hash

    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  augment:\n    cmd: agreelens augment\n    outs:\n"
                    "    - path: augmented\n      md5: abc123.dir\n")
    assert stage_out_hash("augment", "augmented", lock) == "abc123.dir"
    assert stage_out_hash("augment", "other", lock) == "unknown" and stage_out_hash("x", "y", tmp_path / "no") == "unknown"


def test_promotion_on_natural_text_and_a_frozen_evaluation_set(tmp_path, monkeypatch):
    ok, why = promotion({"na_accuracy": 0.9, "natural_attr": 0.55, "test_ppl": 40},
                        {"na_accuracy": 0.8, "natural_attr": 0.7}, 0.01, 100)
    assert not ok and "natural-text accuracy at >= 1 attractor 55.00% is below" in why
    assert promotion({"na_accuracy": 0.8, "natural_attr": 0.7, "test_ppl": 40}, {}, 0.01, 100)[0]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    from agreelens.config import ModelConfig
    from agreelens.model import RNNModel, save_model
    from agreelens.registry import eval_set_hash, register
    from agreelens.vocab import Vocab

    vocab = Vocab(["<eos>", "<unk>", "the", "boy", "likes"])
    mdir = save_model(RNNModel(len(vocab), ModelConfig(emb_size=4, hidden_size=4, layers=1, dropout=0.0, softmax="full")), vocab,
                      tmp_path / "m")
    (tmp_path / "a.jsonl").write_text("1\n")
    (tmp_path / "b.jsonl").write_text("2\n")
    set_a, set_b = eval_set_hash([tmp_path / "a.jsonl"]), eval_set_hash([tmp_path / "b.jsonl"])
    assert set_a != set_b and set_a == eval_set_hash([tmp_path / "a.jsonl"])
    register(mdir, "agreelens-f", {"na_accuracy": 0.9, "natural_attr": 0.9, "test_ppl": 9}, {"eval_set": set_a})
    rescored = []
    # the champion's 0.9 was measured on set a; on set b it scores 0.5, below the new version's 0.6
    d = register(mdir, "agreelens-f", {"na_accuracy": 0.6, "natural_attr": 0.6, "test_ppl": 9}, {"eval_set": set_b},
                 rescore=lambda m: rescored.append(m) or {"na_accuracy": 0.5, "natural_attr": 0.5})
    assert d.alias == "champion" and len(rescored) == 1 and (rescored[0] / "model.safetensors").is_file()
    # same set: compared on the registered metrics, no rescoring
    d = register(mdir, "agreelens-f", {"na_accuracy": 0.5, "natural_attr": 0.5, "test_ppl": 9}, {"eval_set": set_b},
                 rescore=lambda m: rescored.append(m) or {})
    assert d.alias == "challenger" and len(rescored) == 1
