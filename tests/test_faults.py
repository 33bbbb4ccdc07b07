"""Runs you can trust: exact resume, atomic checkpoints, clean stops, skipped non-finite updates,
failing reward functions."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from rlctl.build import build_train
from rlctl.checkpoint import latest_checkpoint
from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.errors import RlctlError
from rlctl.rewards import WeightedRewards
from rlctl.rewards.rules import Term, load_user_reward
from rlctl.trainer import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "DS_ACCELERATOR": "cpu"}
VARYING = "reward.terms=[{name: format, pattern: ing}]"  # a reward the tiny model sometimes earns


def compose_train(*overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=["recipe=smoke", "logger.console=false", "eval.enabled=false", *overrides])


def train_steps(run_dir, *overrides):
    return train(build_train(compose_train(*overrides), run_dir))


def step_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drop = ("time", "time/", "throughput/", "trpo/time_", "memory/")  # wall-clock and memory figures
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(drop)} for r in rows if "reward/mean" in r}


@pytest.mark.parametrize(
    "algo",
    [["algo=ppo"], ["algo=trpo", "algo.advantage=gae", "algo.fisher_fraction=0.5", "algo.cg_damping=0.001"]],
    ids=["ppo", "trpo-gae"],  # TRPO: its Fisher rows come from the restored RNG; its critic has an optimiser
)
def test_resuming_gives_bitwise_the_same_metrics_and_weights_as_training_straight(tmp_path, algo):
    common = [*algo, VARYING, "optim.lr=1e-3", "critic.lr=1e-3", "checkpoint.every=2"]
    train_steps(tmp_path / "straight", "steps=4", *common)
    train_steps(tmp_path / "split", "steps=2", *common)
    train_steps(tmp_path / "split", "steps=4", "resume=auto", *common)
    straight, split = step_rows(tmp_path / "straight"), step_rows(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4]
    assert straight == split  # every logged value, bit for bit (json round-trips floats exactly)
    for part in ("policy", "critic"):
        a = load_file(latest_checkpoint(tmp_path / "straight") / part / "model.safetensors")
        b = load_file(latest_checkpoint(tmp_path / "split") / part / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the weights did move, so the comparison means something
    first = load_file(tmp_path / "straight" / "checkpoints" / "step-000002" / "policy" / "model.safetensors")
    last = load_file(latest_checkpoint(tmp_path / "straight") / "policy" / "model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_keep_last_prunes_old_checkpoints_and_latest_points_at_the_newest(tmp_path):
    train_steps(tmp_path, "steps=5", "checkpoint.every=1", "checkpoint.keep_last=2")
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path).name == "step-000005"


def test_resuming_from_a_different_model_is_refused_with_a_clear_message(tmp_path):
    train_steps(tmp_path, "steps=1")
    cfg = compose_train("steps=2", "resume=auto", "model.path=embedded:smollm2-135m")
    with pytest.raises(
        RlctlError,
        match="^resume: .* was trained with other settings: model.path \\('random:tiny' -> 'embedded:smollm2-135m'\\)",
    ):
        build_train(cfg, tmp_path)
    with pytest.raises(RlctlError, match="has no critic but this algorithm needs one"):
        build_train(compose_train("steps=2", "resume=auto", "algo=ppo"), tmp_path)


@pytest.mark.integration
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    # A child trains one step (checkpoint step-1), then saves again with fsync made to hang, so we
    # can SIGKILL it in the middle of writing step-2.
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.argv = ["x"]
        from tests.test_faults import compose_train
        from rlctl.build import build_train
        from rlctl.trainer import TrainState, save_resumable, train_step
        from pathlib import Path
        stages = build_train(compose_train("steps=3", "checkpoint.every=1"), Path({str(tmp_path)!r}))
        state = TrainState(step=1)
        train_step(stages, state)
        save_resumable(stages, state)
        state.step = 2
        train_step(stages, state)
        os.fsync = lambda fd: (print("saving", flush=True), time.sleep(600))
        save_resumable(stages, state)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV, cwd=os.getcwd()
    )
    assert any(line.strip() == "saving" for line in child.stdout)  # step-2.tmp is being written now
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "step-000002.tmp").exists() and not (checkpoints / "step-000002").exists()
    assert latest_checkpoint(tmp_path).name == "step-000001"
    # ... and a resumed run picks it up and finishes.
    summary = train_steps(tmp_path, "steps=2", "resume=auto")
    assert summary["final_metrics"]["step"] == 2


@pytest.mark.integration
def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "rlctl", "train", "recipe=smoke", "steps=500", "eval.enabled=false", "logger.sample_every=0",
         f"hydra.run.dir={run}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )  # fmt: skip
    for line in child.stdout:
        if line.startswith("step 2/500"):
            child.send_signal(signal.SIGTERM)
            break
    output = child.stdout.read()
    assert child.wait(timeout=120) == 0, output
    assert "SIGTERM: stopped after step" in output and "resume=auto" in output
    stopped_at = latest_checkpoint(run)
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) >= 2
    assert not (run / "checkpoints" / "final").exists()  # a stopped run is resumable, not finished


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(tmp_path):
    reward_file = tmp_path / "huge.py"
    # Finite rewards so large that REINFORCE's loss (−A·log π) overflows to inf.
    reward_file.write_text("def score(completion, answer):\n    return 3e38\n")
    with pytest.raises(RlctlError, match="2 steps in a row had a non-finite loss or gradient"):
        train_steps(tmp_path, "algo=reinforce", f"reward.fn={reward_file}:score", "steps=5",
                    "checkpoint.max_consecutive_skips=2", "engine.precision=no")  # fmt: skip
    rows = step_rows(tmp_path)
    assert [rows[s]["health/skipped_steps"] for s in (1, 2)] == [1.0, 2.0]
    assert all(rows[s]["optim/updates"] == 0 for s in (1, 2))


def test_engine_skips_a_non_finite_update_without_touching_weights_or_moments(tmp_path):
    stages = build_train(compose_train("algo.kl_coef=0"), tmp_path)
    engine = stages.policy
    before = [p.detach().clone() for p in engine.model.parameters()]
    sum(p.sum() for p in engine.model.parameters()).mul(float("nan")).backward()
    assert math.isnan(engine.step())
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    assert engine.optimizer.state_dict()["state"] == {} and engine.scheduler.scheduler.last_epoch == 0


def test_a_failing_reward_scores_the_fallback_and_is_counted():
    calls = []

    def flaky(completion, answer):
        calls.append(completion)
        if completion == "boom":
            raise ZeroDivisionError("bad")
        if completion == "slow":
            time.sleep(2)
        return 1.0

    from rlctl.rewards import RULES

    RULES["flaky_test"] = flaky
    try:
        rewards = WeightedRewards([Term("flaky_test", 1.0, {})], timeout_s=0.5, fallback=-1.0)
        result = rewards(["ok", "boom", "slow", "ok"], ["", "", "", ""])
        assert result.scores.tolist() == [1.0, -1.0, -1.0, 1.0] and rewards.errors == 2
        stopping = WeightedRewards([Term("flaky_test", 1.0, {})], on_error="stop")
        with pytest.raises(RlctlError, match="reward 'flaky_test' failed on completion 'boom': ZeroDivisionError: bad"):
            stopping(["boom"], [""])
    finally:
        del RULES["flaky_test"]


def test_user_reward_files_load_or_fail_with_a_message_that_names_the_problem(tmp_path):
    good = tmp_path / "mine.py"
    good.write_text(
        "def score(completion, answer):\n    return float(answer in completion)\n\ndef one(x):\n    return 0\n"
    )
    assert load_user_reward(f"{good}:score")("it is 4", "4") == 1.0
    for spec, message in [
        (f"{tmp_path}/missing.py:score", "file not found"),
        (f"{good}:nope", "defines no function 'nope' (it defines: ['one', 'score'])"),
        (
            f"{good}:one",
            "must accept (completion, answer) and return a score, or, batched as in TRL, (completions, answers)",
        ),
        ("score", "expected 'path/to/file.py:function'"),
    ]:
        with pytest.raises(
            RlctlError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
        ):
            load_user_reward(spec)


def test_a_user_reward_trains_end_to_end_and_errors_are_logged(tmp_path):
    reward_file = tmp_path / "r.py"
    reward_file.write_text(
        "def score(completion, answer):\n    if 'ing' in completion:\n        raise ValueError('no')\n    return 1.0\n"
    )
    train_steps(tmp_path / "run", f"reward.fn={reward_file}:score", "steps=2")
    rows = step_rows(tmp_path / "run")
    assert rows[1]["reward/errors"] > 0 and "reward/errors" in rows[2]


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_folder(tmp_path):
    import errno

    from rlctl.checkpoint import write_checkpoint
    from rlctl.distributed import Ranks

    class DiskFills:  # an engine whose save writes part of its files, then finds the disk full
        def save(self, folder, tokenizer, training_state=True):
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RlctlError, match=r"^checkpoint: writing step-000003 in .* failed: no space left on device; "
                                         r"the last complete checkpoint is none"):  # fmt: skip
        write_checkpoint(tmp_path, 3, {"policy": DiskFills()}, None, Ranks(), 2, {})
    assert list((tmp_path / "checkpoints").glob("step-*")) == []
