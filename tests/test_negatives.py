"""The agreement margin loss (agreelens/negatives.py): verb pairs found without a tagger, the swap
table, the hinge's known values on hand-set logits and on an adaptive softmax, and its effect in training."""

import hashlib

import numpy as np
import pytest
import torch
import yaml

from agreelens.config import ModelConfig, load_params
from agreelens.corpus import read_split
from agreelens.model import RNNModel, load_model
from agreelens.negatives import (attractor_flags, determiner_flags, find_verb_pairs, margin_loss, noun_pairs, number_loss,
                                 swap_table, verb_numbers)
from agreelens.stimuli import StimuliConfig
from agreelens.train import train
from agreelens.vocab import Vocab
from tests.models import random_lstm, stimuli_vocab
from tests.test_train import _tiny


def _corpus():
    lines = (["he knows it", "she knows him", "they know it", "we know", "to know it", "i know"] * 3
             + ["the cars are red", "a cars", "he is here", "they are here"] * 5
             + ["he often goes", "to go"] * 3  # an adverb may stand between pronoun and verb
             + ["he sometimes sings", "they sometime sing"] * 3  # "sometimes" is closed-class, not a verb
             + ["he likes it", "they like it"] * 2)  # seen twice: under min_count
    words = {w for line in lines for w in line.split()}
    return lines, Vocab(["<eos>", "<unk>", *sorted(words)])


def test_verb_pairs_are_found_from_their_contexts():
    lines, vocab = _corpus()
    pairs = find_verb_pairs(lines, vocab, min_count=3)
    assert pairs[0] == ("is", "are")  # auxiliaries come first, only those in the vocabulary
    assert set(pairs) == {("is", "are"), ("knows", "know"), ("goes", "go")}, pairs
    assert ("likes", "like") in find_verb_pairs(lines, vocab, min_count=2)


def test_swap_table_is_symmetric_and_honours_exclusions():
    _, vocab = _corpus()
    table = swap_table([("is", "are"), ("knows", "know"), ("missing", "miss")], vocab, exclude=["know"])
    assert table[vocab.index("is")] == vocab.index("are") and table[vocab.index("are")] == vocab.index("is")
    assert table[vocab.index("knows")] == -1 and table[vocab.index("know")] == -1  # held out, both forms
    assert int((table >= 0).sum()) == 2  # words not in the vocabulary are skipped


def test_margin_loss_is_the_hinge_on_hand_set_logits():
    vocab = Vocab(["<eos>", "<unk>", "is", "are", "the"])
    cfg = ModelConfig(emb_size=4, hidden_size=4, layers=1, dropout=0.0, softmax="full")
    model = RNNModel(len(vocab), cfg)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
        model.decoder.weight[vocab.index("is"), 0] = 1.0  # logit(is) = feature 0, logit(are) = 0
    swap = swap_table([("is", "are")], vocab)
    features = torch.tensor([[[2.0, 0, 0, 0]], [[7.0, 0, 0, 0]], [[9.0, 0, 0, 0]]])  # (T=3, B=1, H)
    targets = torch.tensor([[vocab.index("is")], [vocab.index("is")], [vocab.index("the")]])
    # margins 2 and 7 at the two "is" targets; "the" has no swap. delta 5: hinge 3 + 0, over 3 targets
    assert margin_loss(model, features, targets, swap, delta=5.0).item() == 1.0
    targets[0, 0] = vocab.index("are")  # margin log P(are) - log P(is) = -2: hinge 7
    assert margin_loss(model, features, targets, swap, delta=5.0).item() == pytest.approx(7.0 / 3)
    none = torch.full_like(targets, vocab.index("the"))
    assert margin_loss(model, features, none, swap, delta=5.0).item() == 0.0
    weights = torch.tensor([[0.0], [2.0], [1.0]])  # weight 0 leaves the first target out; the second's hinge is 0
    assert margin_loss(model, features, targets, swap, delta=5.0, weights=weights).item() == 0.0
    weights[1, 0] = 0.0
    weights[0, 0] = 3.0
    assert margin_loss(model, features, targets, swap, delta=5.0, weights=weights).item() == pytest.approx(21.0 / 3)


def test_determiner_flags_mark_nouns_after_a_determiner_of_their_number():
    vocab = Vocab("<eos> <unk> a an these those that each book books egg eggs store stores grocery is are".split())
    nouns = noun_pairs(vocab, [("is", "are")])
    assert set(nouns) == {("book", "books"), ("egg", "eggs"), ("store", "stores")}  # "grocery" has no plural here
    assert noun_pairs(vocab, [("is", "are")], exclude=["eggs"]) == [("book", "books"), ("store", "stores")]
    text = ("a book is <eos> these books are <eos> an egg <eos> those eggs <eos> that book <eos> each books "
            "<eos> these grocery stores <eos> these book stores <eos> books <eos> the books")
    ids = np.array([vocab.index(w) if w in vocab else vocab.index("<unk>") for w in text.split()])
    marked = [(text.split()[i - 1], text.split()[i]) for i in np.flatnonzero(determiner_flags(ids, vocab, nouns))]
    # "that" is not a number determiner (also a conjunction); "each books" disagrees; the first noun of a
    # compound after a plural determiner is singular ("these book stores") and not marked
    assert marked == [("a", "book"), ("these", "books"), ("an", "egg"), ("those", "eggs")]
    assert determiner_flags(ids[:1], vocab, nouns).tolist() == [False]


def test_attractor_flags_mark_verbs_after_a_noun_of_the_other_number():
    vocab = Vocab("<eos> <unk> the boy boys car cars near knows know is are he they to said".split())
    pairs = [("is", "are"), ("knows", "know")]
    swap = swap_table(pairs, vocab)

    def marked(*lines):
        ids = vocab.encode_lines(lines).numpy()
        return [vocab.itos[i] for i, f in zip(ids, attractor_flags(ids, vocab, pairs, swap)) if f]

    assert marked("the boy near the cars knows", "the boys near the car know") == ["knows", "know"]
    assert marked("the car near the boys is") == ["is"]
    assert marked("the boy knows", "the boys near the cars know") == []  # the nearest noun agrees
    assert marked("the boys said he knows") == []  # a pronoun closer to the verb is its subject
    assert marked("the cars to know", "the boy near the know") == []  # not finite; a noun after "the"
    assert marked("the cars", "knows") == []  # the noun of the sentence before does not count
    # weights scale each target's hinge: two "is" targets of margin 2 and 7, delta 5, weight 4 on the first
    v2 = Vocab(["<eos>", "<unk>", "is", "are", "the"])
    model = RNNModel(len(v2), ModelConfig(emb_size=4, hidden_size=4, layers=1, dropout=0.0, softmax="full"))
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
        model.decoder.weight[v2.index("is"), 0] = 1.0
    features = torch.tensor([[[2.0, 0, 0, 0]], [[7.0, 0, 0, 0]]])
    targets = torch.full((2, 1), v2.index("is"))
    w = torch.tensor([[4.0], [1.0]])
    assert margin_loss(model, features, targets, swap_table([("is", "are")], v2), 5.0, w).item() == 6.0  # 4 * 3 / 2
    assert np.array_equal(attractor_flags(np.array([], dtype=np.int64), vocab, pairs, swap), [])


def test_margin_loss_matches_full_log_probs_on_an_adaptive_softmax():
    cfg = StimuliConfig()
    vocab = stimuli_vocab(cfg, shuffle=True)  # verb forms in the head and in both tail clusters, mixed
    model = random_lstm(vocab)
    swap = swap_table([tuple(v) for v in cfg.verbs], vocab)
    torch.manual_seed(0)
    targets = torch.randint(2, len(vocab), (6, 5))
    features = torch.randn(6, 5, model.cfg.hidden_size)
    logp = model.log_probs(features)
    mask = swap[targets] >= 0
    expected = torch.relu(3.0 - (logp.gather(-1, targets[..., None])[..., 0]
                                 - logp.gather(-1, swap[targets].clamp(min=0)[..., None])[..., 0]))[mask].sum() / 30
    assert mask.any()
    got = margin_loss(model, features, targets, swap, delta=3.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training's CPU mixed precision: runs, close
        torch.testing.assert_close(margin_loss(model, features, targets, swap, delta=3.0).float(), expected,
                                   rtol=0.05, atol=0.05)


def _mean_verb_margin(project, vocab_pairs) -> float:
    model, vocab = load_model(project / "models" / "large")
    swap = swap_table(vocab_pairs, vocab)
    ids = vocab.encode_lines(read_split(project / "prepared" / "valid.txt"))
    x, y = ids[:-1, None], ids[1:, None]
    with torch.no_grad():
        features, _ = model(x)
        other = swap[y]
        mask = other >= 0
        return model.target_margin(features[mask], y[mask], other[mask]).mean().item()


def test_number_loss_is_the_logistic_loss_of_a_hand_set_readout():
    vocab = Vocab(["<eos>", "<unk>", "is", "are", "the", "knows", "know"])
    swap = swap_table([("is", "are"), ("knows", "know")], vocab, exclude=["knows"])
    numbers = verb_numbers(swap, vocab, [("is", "are"), ("knows", "know")])
    assert numbers.tolist() == [0, 0, 1, -1, 0, 0, 0]  # excluded pairs carry no label
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))  # logit of "singular" = feature 0
        head.bias.zero_()
    features = torch.tensor([[[2.0, 5.0]], [[-1.0, 3.0]], [[4.0, 0.0]], [[0.0, 0.0]]])  # (T=4, B=1, H=2)
    targets = torch.tensor([[vocab.index("is")], [vocab.index("is")], [vocab.index("are")], [vocab.index("the")]])
    sp = torch.nn.functional.softplus
    # -log sigmoid(2) + -log sigmoid(-1) at the two "is", -log(1 - sigmoid(4)) at "are", over 4 targets
    expected = (sp(torch.tensor(-2.0)) + sp(torch.tensor(1.0)) + sp(torch.tensor(4.0))) / 4
    assert number_loss(head, features, targets, numbers).item() == pytest.approx(expected.item())
    weights = torch.tensor([[1.0], [3.0], [1.0], [9.0]])  # the second "is" counts three times; "the" not at all
    expected = (sp(torch.tensor(-2.0)) + 3 * sp(torch.tensor(1.0)) + sp(torch.tensor(4.0))) / 4
    assert number_loss(head, features, targets, numbers, weights).item() == pytest.approx(expected.item())
    none = torch.full_like(targets, vocab.index("the"))
    assert number_loss(head, features, none, numbers).item() == 0.0


def test_training_with_the_margin_loss_widens_held_out_verb_margins(project):
    params = _tiny(project, max_steps=40, lr=0.01, agreement_loss=0.0)
    stimuli_verbs = {w for pair in params.stimuli.verbs for w in pair}  # never in the loss
    pairs = [p for p in find_verb_pairs(read_split(project / "augmented" / "train_large.txt"),
                                        Vocab.load(project / "prepared" / "vocab.txt"))
             if not set(p) & stimuli_verbs]  # the pairs training uses
    plain = train(params, "large", quiet=True)
    before = _mean_verb_margin(project, pairs)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["profiles"]["tiny"]["train"].update(agreement_loss=10.0, agreement_margin=5.0, attractor_weight=1.0)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    summary = train(load_params(project / "params.yaml"), "large", quiet=True)
    after = _mean_verb_margin(project, pairs)
    assert summary["agreement_pairs"] >= 4 and "agreement_pairs" not in plain
    assert after > before + 0.5, (before, after)  # the observed verb forms of unseen text gain on their swaps


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_margin_gradients_are_reproducible_on_a_multithreaded_cpu(softmax):
    # A few verb ids repeated thousands of times per batch, as in training: with `w[ids]` the backward
    # accumulated repeated rows with atomic adds, and two runs of the pipeline trained different models.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(emb_size=8, hidden_size=512, layers=1, dropout=0.0, softmax=softmax,
                          cutoffs=[100, 300], div_value=1.0)
        model = RNNModel(400, cfg)
        features = torch.randn(4000, 512)
        verbs = torch.tensor([3, 5, 7, 9, 150, 152, 154, 156])  # head pairs and tail-cluster pairs
        pick = torch.randint(0, 4, (4000,)) * 2  # pair k: verbs[2k] (observed), verbs[2k + 1] (swap)
        good, bad = verbs[pick], verbs[pick + 1]
        grads = set()
        for _ in range(4):
            model.zero_grad()
            model.target_margin(features, good, bad).sum().backward()
            grads.add(hashlib.sha1(b"".join(p.grad.numpy().tobytes() for p in model.decoder.parameters()
                                            if p.grad is not None)).hexdigest())
        assert len(grads) == 1
    finally:
        torch.set_num_threads(before)
