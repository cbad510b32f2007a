"""Unit ablation on the NA task: batched margins equal the scorer on weight-zeroed copies, many masks in
one pass equal one at a time, a planted number unit is found by the sweep, Table 7, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from agreelens.ablation import ablate, plan_pairs, plot_sweep, sweep, table7_rows, verb_margins
from agreelens.config import ModelConfig
from agreelens.model import RNNModel, save_model
from agreelens.scoring import pair_margins, prefix_trie
from agreelens.stimuli import StimuliConfig, generate, write
from agreelens.text import tokenize
from agreelens.trace import unit_mask
from tests.conftest import run_cli
from tests.models import H, planted_model, random_lstm, stimuli_vocab, zero_outgoing

N = 6  # pairs per condition


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def stim_cfg():
    return StimuliConfig(n_per_condition=N)


@pytest.fixture(scope="module")
def vocab(stim_cfg):
    return stimuli_vocab(stim_cfg, shuffle=True)  # verb forms in the head and both tail clusters, mixed


@pytest.fixture(scope="module")
def pairs(stim_cfg, vocab):
    return generate(stim_cfg, vocab)[0]


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_margins_equal_scorer_on_zeroed_copies(vocab, pairs, stim_cfg, softmax):
    model = random_lstm(vocab, softmax)
    cluster = lambda w: sum(vocab.stoi[w] >= c for c in (20, 60))  # noqa: E731
    kinds = {cluster(sg) == cluster(pl) for sg, pl in stim_cfg.verbs}
    assert kinds == {True, False}  # same-cluster and cross-cluster verb pairs
    ablations = [[], [3], [H + 2], [1, H + 5]]  # none, a layer-1 unit, a layer-2 unit, both layers
    masks = torch.stack([unit_mask(a, H, 2) for a in ablations])
    margins, scored = verb_margins(model, vocab, pairs, masks)
    assert margins.shape == (len(ablations), len(pairs)) and margins.dtype == torch.float64 and scored.all()
    for k, units in enumerate(ablations):
        want, want_scored = pair_margins(zero_outgoing(model, units), vocab, pairs, method="prefix")
        assert torch.equal(scored, want_scored)
        assert torch.allclose(margins[k], want, atol=2e-5), units
    assert not torch.allclose(margins[0], margins[2], atol=1e-3)  # the ablations changed something


def test_many_ablations_in_one_pass_equal_one_at_a_time(vocab, pairs):
    model = random_lstm(vocab, "adaptive", seed=3)
    ablations = [[u] for u in range(1, 2 * H + 1)] + [[2, 9, 15]]
    masks = torch.stack([unit_mask(a, H, 2) for a in ablations])
    together, _ = verb_margins(model, vocab, pairs, masks, chunk=len(ablations))
    chunked, _ = verb_margins(model, vocab, pairs, masks, chunk=5)  # chunks that span both layers
    for k in (0, 7, 8, 12, 16):
        alone, _ = verb_margins(model, vocab, pairs, masks[k : k + 1])
        assert torch.allclose(together[k], alone[0], atol=1e-5)
    assert torch.allclose(together, chunked, atol=1e-5)


def test_plan_is_the_prefix_trie_of_the_scored_pairs(vocab, pairs):
    odd = [{**pairs[0], "one_prefix_word_good": "zebras"}, *pairs]
    plan = plan_pairs(vocab, odd)
    seqs = [[vocab.eos, *vocab.encode(tokenize(p["one_prefix_prefix"]))] for p in pairs]
    tokens, parents, leaves = prefix_trie(seqs)
    assert [t.tolist() for t in plan.tokens] == tokens
    assert [p.tolist() for p in plan.parents] == [[], *parents[1:]]
    assert sum(t.numel() for t in plan.tokens) < sum(map(len, seqs)) // 2  # prefixes share their beginnings
    assert plan.scored.tolist() == [False] + [True] * len(pairs)
    for end in plan.ends:
        for k, node in zip(end.pairs.tolist(), end.nodes[end.inv].tolist()):
            assert len(seqs[k - 1]) - 1 == end.depth and leaves[k - 1] == node
    assert sorted(i for end in plan.ends for i in end.pairs.tolist()) == list(range(1, len(odd)))


def test_oov_verbs_are_not_scored(vocab, pairs):
    model = random_lstm(vocab, "full")
    odd = [*pairs[:3], {**pairs[3], "one_prefix_word_good": "zebras"}]
    margins, scored = verb_margins(model, vocab, odd, torch.ones(2, 2 * H))
    assert scored.tolist() == [True, True, True, False]
    assert torch.isnan(margins[:, 3]).all() and not torch.isnan(margins[:, :3]).any()


def test_sweep_finds_the_planted_number_unit(vocab, pairs, stim_cfg, tmp_path):
    model = planted_model(vocab, stim_cfg)
    r = sweep(model, vocab, pairs, progress=False, chunk=5)
    assert set(r["base_accuracy"].values()) == {1.0}
    assert [u["unit"] for u in r["number_units"]] == [1]
    assert r["number_units"][0]["layer"] == 1 and r["number_units"][0]["index"] == 0
    assert r["number_units"][0]["max_drop"] >= 40
    assert len(r["drops"]) == 2 * H and all(len(d) == len(r["conditions"]) == 18 for d in r["drops"].values())
    assert max(max(d) for u, d in r["drops"].items() if u != "1") < 10
    assert sum(r["n"].values()) == r["pairs"] == len(pairs)
    # restricted to some constructions, the same unit
    sub = sweep(model, vocab, pairs, constructions=["nounpp", "simple"], progress=False)
    assert set(sub["conditions"]) == {"nounpp/SS", "nounpp/SP", "nounpp/PS", "nounpp/PP", "simple/S", "simple/P"}
    assert [u["unit"] for u in sub["number_units"]] == [1]
    with pytest.raises(ValueError, match="unknown construction"):
        sweep(model, vocab, pairs, constructions=["nope"], progress=False)
    fig = plot_sweep(r, tmp_path / "sweep.png", top=5)
    assert fig.stat().st_size > 1000


def test_table7_dashes_small_drops(vocab, pairs, stim_cfg):
    model = planted_model(vocab, stim_cfg)
    r = ablate(model, vocab, pairs, [1, H + 1])
    assert r["ablations"] == ["1", "9", "1+9"]
    assert r["accuracy"]["full"] == 1.0 and r["accuracy"]["9"] == 1.0 and r["accuracy"]["1"] < 0.8
    header, rows = table7_rows(r)
    assert header == ["NA task", "C", "Ablated 1", "Ablated 9", "Ablated 1+9", "Full"]
    assert len(rows) == 18 and rows[0][:2] == ["Simple", "S"] and rows[-1][:2] == ["nounPPAdv", "PP"]
    assert all(row[3] == "-" and row[-1] == "100.0" for row in rows)  # a relay alone is redundant
    dropped = [row for row in rows if row[2] != "-"]
    assert dropped and all(float(row[2]) <= 90.0 for row in dropped)
    conds = [row[1] for row in rows]
    assert conds.index("P") > max(i for i, c in enumerate(conds) if c in ("S", "SS", "SP"))  # singular first


@pytest.fixture()
def cli_project(tmp_path, vocab, stim_cfg, pairs):
    (tmp_path / "params.yaml").write_text("train:\n  threads: 1\n")
    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=8, hidden_size=H, softmax="adaptive", cutoffs=[20, 60], div_value=2.0)
    model = RNNModel(len(vocab), cfg)
    save_model(model, vocab, tmp_path / "models" / "rand")
    write(pairs, tmp_path / "stimuli")
    return tmp_path


def test_cli_ablate_json_and_errors(cli_project):
    out = run_cli(["ablate", "--model", "rand", "--units", "3,12", "--json"], cwd=cli_project)
    r = json.loads(out.stdout)
    assert r["model"] == "rand" and r["units"] == [3, 12] and r["ablations"] == ["3", "12", "3+12"]
    assert set(r["accuracy"]) == {"full", "3", "12", "3+12"} and r["n"] == 18 * N and r["oov"] == 0
    assert len(r["groups"]) == 18
    assert all(set(g) == {"n", "full", "3", "12", "3+12"} and g["n"] == N for g in r["groups"].values())
    table = run_cli(["ablate", "--model", "rand", "--units", "3"], cwd=cli_project)
    assert "Table 7" in table.stdout and "nounPP" in table.stdout
    bad = run_cli(["ablate", "--model", "rand", "--units", "3,17"], cwd=cli_project, check=False)
    assert bad.returncode == 1 and "unit 17 out of range: units are 1..16" in bad.stderr
    (cli_project / "empty").mkdir()
    missing = run_cli(["ablate", "--model", "rand", "--units", "3", "--stimuli", "empty"], cwd=cli_project, check=False)
    assert missing.returncode == 1 and "agreelens stimuli" in missing.stderr


def test_cli_sweep_writes_metrics_and_figure(cli_project):
    out = run_cli(["sweep", "--model", "rand", "--constructions", "nounpp,simple"], cwd=cli_project)
    r = json.loads((cli_project / "metrics" / "units_rand.json").read_text())
    assert (cli_project / "reports" / "figures" / "sweep_rand.png").stat().st_size > 1000
    assert set(r) >= {"model", "conditions", "base_accuracy", "drops", "number_units", "threshold"}
    assert len(r["drops"]) == 2 * H and len(r["conditions"]) == 6
    assert "number unit(s) of 16" in out.stdout
