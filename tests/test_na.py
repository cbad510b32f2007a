import json

import pytest
import torch

from agreelens.config import ModelConfig, resolve
from agreelens.model import RNNModel, save_model
from agreelens.na import evaluate_na, resolve_model, table6
from agreelens.stimuli import StimuliConfig, generate, write
from agreelens.vocab import Vocab
from tests.conftest import run_cli


@pytest.fixture()
def na_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = StimuliConfig(n_per_condition=5)
    words = {w for pool in ("nouns", "verbs", "location_nouns") for pair in getattr(cfg, pool) for w in pair}
    words |= set(cfg.adverbs) | set(cfg.manner_adverbs) | set(cfg.prepositions) | set(cfg.names) | {"the", "and"}
    vocab = Vocab(["<eos>", "<unk>", *sorted(words)])
    torch.manual_seed(0)
    model = RNNModel(len(vocab), ModelConfig(emb_size=8, hidden_size=8, softmax="adaptive", cutoffs=[20, 60]))
    save_model(model, vocab, tmp_path / "models" / "rand")
    records, _ = generate(cfg, vocab)
    write(records, tmp_path / "stimuli")
    blimp = tmp_path / "blimp"
    blimp.mkdir()
    pair = {"sentence_good": "the boy likes the girl .", "sentence_bad": "the boy like the girl .",
            "one_prefix_prefix": "the boy", "one_prefix_word_good": "likes", "one_prefix_word_bad": "like",
            "UID": "toy_agreement", "pairID": "0"}
    oov = {**pair, "one_prefix_word_good": "zebras", "one_prefix_word_bad": "zebra", "pairID": "1"}
    (blimp / "toy.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps(oov) + "\n")
    return tmp_path, len(records)


def test_evaluate_na_reports_every_construction_and_condition(na_project):
    root, n = na_project
    params = resolve({"train": {"threads": 1}})
    r = evaluate_na(params, "rand", stimuli_dir=root / "stimuli", blimp_dir=root / "blimp")
    assert r["n"] == n and r["oov"] == 0
    assert set(r["constructions"]) == {"simple", "adv", "adv_adv", "adv_conjunction", "namepp", "nounpp", "nounpp_adv"}
    assert set(r["conditions"]) == {"S", "P", "SS", "SP", "PS", "PP"}
    assert sum(g["n"] for g in r["groups"].values()) == n
    overall = sum(g["accuracy"] * g["n"] for g in r["groups"].values()) / n
    assert r["accuracy"] == pytest.approx(overall, abs=1e-3)
    assert r["blimp"]["n"] == 1 and r["blimp"]["oov"] == 1  # the OOV pair is counted, not scored
    assert json.loads((root / "metrics" / "na_rand.json").read_text()) == r


def test_score_cli_prints_one_json_object(na_project):
    root, n = na_project
    out = run_cli(["score", "stimuli/nounpp.jsonl", "blimp/toy.jsonl", "--model", "models/rand", "--json"], cwd=root)
    result = json.loads(out.stdout)
    assert set(result) >= {"accuracy", "n", "oov", "groups"}
    assert result["n"] == 4 * 5 + 1 and result["oov"] == 1
    assert set(result["groups"]) == {"nounpp/SS", "nounpp/SP", "nounpp/PS", "nounpp/PP", "toy_agreement"}
    bad = run_cli(["score", "stimuli/nounpp.jsonl", "--model", "nope"], cwd=root, check=False)
    assert bad.returncode == 1 and "model 'nope' not found" in bad.stderr


def test_table6_puts_paper_figures_beside_ours(na_project):
    root, _ = na_project
    params = resolve({"train": {"threads": 1}})
    (root / "models" / "rand").rename(root / "models" / "small")
    evaluate_na(params, "small", stimuli_dir=root / "stimuli", blimp_dir=root / "blimp")
    (root / "metrics" / "na_large.json").write_text((root / "metrics" / "na_small.json").read_text())
    (root / "metrics" / "eval.json").write_text(json.dumps(
        {"small": {"test_ppl": 80.0, "train_tokens": 100}, "large": {"test_ppl": 60.0, "train_tokens": 200}}))
    text = table6(["small", "large"])
    assert "| small | 100 | 80.0 |" in text and "| 110.2 | 89.3 % |" in text and "| 51.0 | 99.57 % |" in text
    assert (root / "reports" / "table6.md").read_text() == text
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model("missing")
