"""bench/agreement_levers.py: arm names with their suffixes, and the mean of an arm over seeds."""

import pytest

from tests.bench_scripts import load_bench


def _module():
    return load_bench("agreement_levers")


def test_arm_names_and_their_suffixes():
    levers = _module()
    assert levers.parse_arm("margin+syntax") == ("margin+syntax", {})
    assert levers.parse_arm("margin+syntax+attr4+stack0.25") == ("margin+syntax", {"attr": 4.0, "stack": 0.25})
    assert levers.parse_arm("margin+syntax+attr+num") == ("margin+syntax", {"attr": 4.0, "num": 1.0})  # defaults
    assert levers.parse_arm("margin+syntax+wiki+attr2") == ("margin+syntax+wiki", {"attr": 2.0})
    with pytest.raises(SystemExit, match=r"unknown arm 'margin\+typo'"):
        levers.parse_arm("margin+typo")


def test_an_arms_mean_over_seeds_keeps_item_counts():
    levers = _module()
    a = {"valid_ppl": 150.0, "dev": {"natural_attr": [0.8, 269], "na_nounpp": None}, "text": "a.txt", "epochs": 1}
    b = {"valid_ppl": 140.0, "dev": {"natural_attr": (0.7, 269), "na_nounpp": 0.9}, "text": "b.txt", "epochs": 1}
    mean = levers._mean([a, b])
    assert mean["valid_ppl"] == 145.0 and mean["epochs"] == 1 and mean["text"] == "a.txt"
    assert mean["dev"]["natural_attr"] == [pytest.approx(0.75), 269]
    assert mean["dev"]["na_nounpp"] is None  # a figure missing in one run is no mean
