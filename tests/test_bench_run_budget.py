"""bench/run_budget.py reads minutes per stage off a stamped `dvc repro` log."""

import pytest

from tests.bench_scripts import load_bench


def _module():
    return load_bench("run_budget")


def test_stage_minutes_of_a_stamped_log():
    log = ["23:58:00 Running stage 'prepare':", "23:58:00 > agreelens prepare", "23:59:30 Updating lock file",
           "23:59:30 Running stage 'train_small':", "not stamped", "00:05:30 Running stage 'report':",
           "00:06:00 Use `dvc push` to send your updates to remote storage."]
    stages, total = _module().stage_minutes(log)
    assert stages == {"prepare": 1.5, "train_small": 6.0, "report": 0.5}  # across midnight
    assert total == 8.0
    with pytest.raises(ValueError, match="no stamped lines"):
        _module().stage_minutes(["Running stage 'prepare':"])
