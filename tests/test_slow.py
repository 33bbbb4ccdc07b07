"""The default run itself (minutes on a CPU): `make test-slow`. Targets, not timings, are asserted."""

import json

import pytest

from tests.test_cli import rlctl


@pytest.mark.slow
def test_the_default_run_lifts_held_out_accuracy_from_low_to_at_least_80_percent(tmp_path):
    rlctl("train", f"hydra.run.dir={tmp_path}", "logger.sample_every=0", timeout=3600)
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["before"]["accuracy"] <= 0.3
    assert evaluation["after"]["accuracy"] >= 0.8


@pytest.mark.slow
def test_ppo_on_the_default_model_raises_held_out_accuracy(tmp_path):
    rlctl("train", "algo=ppo", f"hydra.run.dir={tmp_path}", "logger.sample_every=0", timeout=3600)
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["after"]["accuracy"] > evaluation["before"]["accuracy"]
