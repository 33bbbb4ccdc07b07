"""Nothing silently wrong: each case here once ended with exit 0 having done something other than
what the user asked (or with a traceback). Run through the CLI's ``main`` as a user would: in this
process, or in a subprocess where a fresh interpreter matters (launches, sweeps, W&B, and the
one-line mistakes, proved once end to end)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import rlctl_here

from rlctl.cli import CONF_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "COLUMNS": "200"}
README = Path(__file__).parent.parent / "README.md"


def rlctl(*args, cwd=None, env=None, timeout=600, isolated=False):
    """`rlctl ARGS` in this process (the console script's ``main``), or with ``isolated`` (or an
    ``env`` of its own) in a subprocess, for what depends on a fresh interpreter."""
    if not isolated and env is None:
        return rlctl_here(*args, cwd=cwd)
    return subprocess.run(
        [sys.executable, "-m", "rlctl", *args], capture_output=True, text=True, env=env or ENV, cwd=cwd, timeout=timeout
    )


def training_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "reward/mean" in r]


def test_a_reward_that_always_fails_stops_the_run_with_its_error(tmp_path):
    reward = tmp_path / "r.py"
    reward.write_text('def score(c, a):\n    raise ValueError("boom")\n')
    run = tmp_path / "run"
    result = rlctl("train", "recipe=smoke", "steps=5", f"reward.fn={reward}:score", f"hydra.run.dir={run}")
    assert result.returncode == 1
    assert f"step 1: reward '{reward}:score' failed on 8 samples: ValueError: boom" in result.stdout
    # reward.max_failed_steps = 2: the second step of nothing but fallback scores stops the run, naming
    # the error, before it trains on them; step 1 trained (one bad step may be a fluke).
    assert "failed on every sample for 2 steps in a row (reward.max_failed_steps=2): ValueError: boom" in result.stderr
    assert training_steps(run) == [1]
    assert "ValueError: boom" in (run / "train.log").read_text()  # the folder holds why it stopped


def test_a_trl_style_batched_reward_trains(tmp_path):
    reward = tmp_path / "batched.py"
    reward.write_text(
        "def score(completions, answers):\n    return [float(a in c) for c, a in zip(completions, answers)]\n"
    )
    run = tmp_path / "run"
    result = rlctl("train", "recipe=smoke", f"reward.fn={reward}:score", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"reward/errors"' in line]
    assert [r["reward/errors"] for r in rows] == [0.0, 0.0]


def test_eval_of_a_run_folder_uses_the_runs_data_reward_and_lengths(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(20)))
    run = tmp_path / "run"
    trained = rlctl("train", "recipe=smoke", "steps=1", "data=jsonl", f"data.path={data}", "data.prompt_field=question", "rollout.max_new_tokens=5",
                    "reward=gsm8k", f"hydra.run.dir={run}")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    result = rlctl("eval", f"model.path={run}", "rollout.temperature=0.5")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"] == "jsonl"  # not the arithmetic default
    assert f"settings from {run}/config.yaml: data.source=jsonl, data.path={data}" in result.stderr
    assert "rollout.max_new_tokens=5" in result.stderr
    assert "from the command line: rollout.temperature=0.5" in result.stderr
    assert json.loads(result.stdout)["response_len_mean"] <= 5  # the run's length limit, not 16
    # Picking the rollout option on the command line keeps the run's keys that option does not set:
    # rollout=hf sets the backend (and no correction), the run's max_new_tokens=5 stays (it used to become 16).
    picked = rlctl("eval", f"model.path={run}", "rollout=hf")
    assert picked.returncode == 0, picked.stderr
    assert "rollout.max_new_tokens=5" in picked.stderr and "from the command line: rollout=hf" in picked.stderr
    assert json.loads(picked.stdout)["response_len_mean"] <= 5


def test_a_launch_that_started_one_process_of_two_is_refused(tmp_path):
    # Without a GPU and without --use_deepspeed, accelerate's plain launcher starts ONE process.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlctl", "train", "recipe=smoke",
               f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode != 0
    assert "accelerate started only one" in result.stderr and "--use_deepspeed" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_refuses_a_changed_dataset_and_a_folder_holds_one_run(tmp_path):
    run = tmp_path / "run"
    assert rlctl("train", "recipe=smoke", "steps=1", "eval.enabled=false", f"hydra.run.dir={run}").returncode == 0
    changed = rlctl("train", "recipe=smoke", "steps=2", "data.digits=2", f"hydra.run.dir={run}")
    assert changed.returncode == 1
    assert "was trained with other settings: data.digits (1 -> 2)" in changed.stderr
    fresh = rlctl("train", "recipe=smoke", "steps=2", "resume=never", f"hydra.run.dir={run}")
    assert fresh.returncode == 1 and "already holds a run that trained" in fresh.stderr
    # Allowed changes: more steps (and eval settings). Then re-running the finished run does nothing.
    for _ in range(2):
        more = rlctl("train", "recipe=smoke", "steps=3", "eval.enabled=false", f"hydra.run.dir={run}")
        assert more.returncode == 0, more.stderr
    assert "already finished its 3 steps" in more.stdout
    assert training_steps(run) == [1, 2, 3]  # exact: no step twice, none missing


def test_unknown_keys_are_refused_even_with_a_plus(tmp_path):
    result = rlctl("train", "recipe=smoke", "+optim.lrr=1e-5", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 1
    assert "optim.lrr: no such setting" in result.stderr and "Traceback" not in result.stderr


def test_the_console_is_kept_in_train_log_and_a_failed_start_leaves_its_error(tmp_path):
    run = tmp_path / "run"
    assert rlctl("train", "recipe=smoke", f"hydra.run.dir={run}").returncode == 0
    log = (run / "train.log").read_text()
    assert "step 2/2" in log and "eval after training" in log and "samples at step 1" in log
    assert "[bold]" not in log and "\x1b[" not in log  # markup and colours stripped
    bad = tmp_path / "bad"
    assert rlctl("train", "recipe=smoke", "optim.lr=-1", f"hydra.run.dir={bad}").returncode == 1
    assert "error: optim.lr: must be a positive number" in (bad / "train.log").read_text()


@pytest.mark.integration
def test_a_sweep_goes_on_past_a_failing_job_and_writes_its_summary(tmp_path):
    sweep = tmp_path / "sweep"
    result = rlctl("train", "-m", "recipe=smoke", "steps=1", "eval.enabled=false", "save_final=false",
                   "optim.lr=1e-5,-1,2e-5", f"hydra.sweep.dir={sweep}", isolated=True)  # fmt: skip
    # The other jobs ran; the sweep as a whole failed (it used to exit 0 even when every job failed).
    assert result.returncode == 1
    assert f"error: 1 of 3 sweep jobs failed (1); see {sweep / 'summary.md'}" in result.stderr
    records = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done", "failed", "done"]
    assert "optim.lr: must be a positive number" in records[1]["error"]
    summary = (sweep / "summary.md").read_text()
    assert "| 1 | failed | optim.lr=-1 |" in summary
    # On an 80-column terminal the overrides column and the last column both stay in view.
    from rich.console import Console

    from rlctl.report import sweep_table

    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    sweep_table(sweep, console)
    text = console.export_text()
    assert "optim.lr=2e-05" in text and "failed: optim.lr: must be" in text.replace("\n        ", " ")
    assert "after" in text


@pytest.mark.integration
def test_sft_and_dpo_sweeps_end_with_their_summary_and_fail_when_a_job_did(tmp_path):
    sweep = tmp_path / "sft"
    result = rlctl("sft", "-m", "model=tiny", "steps=1", "examples_per_step=2", "eval.enabled=false", "save_final=false",
                   "optim.lr=1e-4,-1", f"hydra.sweep.dir={sweep}", isolated=True)  # fmt: skip
    assert result.returncode == 1 and "1 of 2 sweep jobs failed" in result.stderr
    records = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done", "failed"] and "loss/sft" in records[0]
    assert "held-out result (eval_before, eval_after): loss" in (sweep / "summary.md").read_text()
    sweep = tmp_path / "dpo"
    result = rlctl("dpo", "-m", "model=tiny", "steps=1", "pairs_per_step=2", "data.pairs_per_problem=1",
                   "eval.enabled=false", "save_final=false", "beta=0.1,0.5", f"hydra.sweep.dir={sweep}", isolated=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done", "done"] and all("loss/dpo" in r for r in records)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "model=tiny", "n=0"], "error: n: must be ≥ 1, got 0"),
        (["train", "recipe=smoke", "rollout.max_new_tokens=0", "dry_run=true"], "rollout.max_new_tokens: must be ≥ 1"),
    ],
)
@pytest.mark.integration
def test_one_line_errors_instead_of_tracebacks(args, message, tmp_path):
    result = rlctl(*args, cwd=tmp_path, isolated=True)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_wandb_without_a_login_suggests_offline_mode(tmp_path):
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB")}
    env.update(WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path), HOME=str(tmp_path), WANDB_MODE="online")
    env["RLCTL_CACHE"] = os.environ.get("RLCTL_CACHE", str(Path.home() / ".cache" / "rlctl"))
    result = rlctl("train", "recipe=smoke", "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}", env=env, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "logger.wandb: W&B could not start a run" in result.stderr and "WANDB_MODE=offline" in result.stderr


@pytest.mark.integration
def test_warnings_for_numbers_without_meaning(tmp_path):
    train = rlctl("train", "recipe=smoke", "steps=1", "rollout.temperature=0", "eval.n_samples=2", "eval.pass_k=[1,2]",
                  f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert "warning: eval.n_samples=2 at eval.temperature=0" in train.stdout
    assert "warning: rollout.temperature=0" in train.stdout
    generate = rlctl("generate", "model=tiny", "prompts=[Hi, what is 2 + 2?]", "rollout.max_new_tokens=2", cwd=tmp_path)
    assert generate.returncode == 0, generate.stderr
    assert "warning: 2 prompts: 'Hi' | 'what is 2 + 2?'" in generate.stderr


def test_eval_accepts_a_recipe_and_version_prints(tmp_path):
    result = rlctl("eval", "recipe=smoke", "rollout.max_new_tokens=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "random:tiny" and "settings from recipe smoke" in result.stderr
    version = rlctl("--version", isolated=True)
    assert re.fullmatch(r"rlctl \d+\.\d+\.\d+\S*\n", version.stdout)


def test_the_docs_list_every_algorithm_and_every_option_of_every_group():
    algorithms = (README.parent / "docs" / "algorithms.md").read_text()
    algo_rows = re.findall(r"^\| `(\w+)`(?: \(default\))? \| .+ \| .+ \| .+ \| .+ \|$", algorithms, re.M)
    assert sorted(algo_rows) == sorted(p.stem for p in (CONF_DIR / "algo").glob("*.yaml"))
    reference = (README.parent / "docs" / "reference.md").read_text()
    for group in ("algo", "model", "data", "reward", "rollout", "env", "logger", "deepspeed", "recipe"):
        assert f"`{group}`" in README.read_text(), f"the README does not name the {group} group"
        for option in (CONF_DIR / group).glob("*.yaml"):
            assert f"| `{option.stem}` |" in reference, f"docs/reference.md lacks {group}={option.stem}"


def test_ctrl_c_during_the_final_evaluation_exits_cleanly_with_a_resume_hint(tmp_path):
    from hydra import compose, initialize_config_dir

    from rlctl.build import build_train
    from rlctl.config import register_schemas
    from rlctl.trainer import train

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=["recipe=smoke", "logger.console=false", "steps=1"])
    stages = build_train(cfg, tmp_path, "rlctl train recipe=smoke steps=1 hydra.run.dir=RUN resume=auto")
    calls, messages = [], []
    evaluate = stages.evaluator

    def interrupted_the_second_time(model):
        calls.append(1)
        if len(calls) == 2:  # before training passes; after training is interrupted
            raise KeyboardInterrupt
        return evaluate(model)

    stages.evaluator = interrupted_the_second_time
    stages.logger.sinks.append(type("Recorder", (), {"metrics": lambda *a: None, "samples": lambda *a: None,
                                                     "message": lambda self, t: messages.append(t),
                                                     "close": lambda self: None})())  # fmt: skip
    summary = train(stages)
    assert summary["stopped_by"] == "SIGINT"
    assert any("interrupted after training" in m and "Resume with: rlctl train recipe=smoke" in m for m in messages)
    assert (tmp_path / "checkpoints" / "latest").exists() and not (tmp_path / "eval.json").exists()


def test_train_log_keeps_library_warnings_too(tmp_path):
    import logging
    import warnings

    from rlctl.logging import LogFileSink

    logging.captureWarnings(False)  # pytest records warnings; the sink must install its own capture
    logging.getLogger("transformers").propagate = True  # as some libraries set it: still one line
    sink = LogFileSink(tmp_path / "train.log", total_steps=1)
    try:
        sink.message("[bold]eval before training:[/bold] accuracy 0.5")
        logging.getLogger("transformers").warning("a transformers warning")  # transformers does not propagate
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a python warning", UserWarning, stacklevel=1)
    finally:
        sink.close()
        logging.getLogger("transformers").propagate = False
    log = (tmp_path / "train.log").read_text()
    assert "eval before training: accuracy 0.5" in log and "[bold]" not in log
    assert log.count("warning: a transformers warning") == 1 and "a python warning" in log


def test_a_reward_that_fails_in_evaluation_is_reported_never_scored_as_zero(tmp_path):
    # It used to print reward_mean 0.0, accuracy 0.0 and exit 0: fallback scores read as a result.
    broken = tmp_path / "broken.py"
    broken.write_text("def score(completion, answer):\n    raise ValueError('boom')\n")
    result = rlctl("eval", "model=tiny", "rollout=hf", "rollout.max_new_tokens=2", "data.eval_size=4",
                   f"reward.fn={broken}:score")  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert (
        "failed on every one of the 4 held-out samples, so there is no held-out score: ValueError: boom"
        in result.stderr
    )
    # Inside train: the evaluation before training says so in its own line and keeps no accuracy.
    run = tmp_path / "run"
    trained = rlctl("train", "recipe=smoke", f"reward.fn={broken}:score", f"hydra.run.dir={run}")
    assert "eval before training: no result: reward" in trained.stdout
    assert "accuracy 0.000" not in trained.stdout
    # A reward that fails on some samples: the score stands, and the failures are said beside it.
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "def score(completion, answer):\n    if int(answer) % 2:\n        raise ValueError('odd')\n    return 1.0\n"
    )
    partial = rlctl("eval", "model=tiny", "rollout=hf", "rollout.max_new_tokens=2", "data.eval_size=8",
                    f"reward.fn={flaky}:score")  # fmt: skip
    errors = json.loads(partial.stdout)["reward_errors"]
    assert (
        0 < errors < 8
        and f"failed on {int(errors)} of 8 held-out samples (scored reward.fallback): ValueError: odd" in partial.stderr
    )


def test_accuracy_of_a_custom_reward_is_the_exact_answer_rule_unless_told_otherwise(tmp_path):
    # A reward of 1.0 for everything used to make a random model's gibberish "accuracy 1.000".
    always = tmp_path / "always.py"
    always.write_text("def score(completion, answer):\n    return 1.0\n")
    common = ["model=tiny", "rollout=hf", "rollout.max_new_tokens=2", "data.eval_size=8", f"reward.fn={always}:score"]
    by_rule = json.loads(rlctl("eval", *common).stdout)
    assert by_rule["reward_mean"] == 1.0 and by_rule["accuracy"] < 1.0  # 2 random tokens rarely hold the sum
    assert by_rule["accuracy_counts"] == "correct when the exact_number rule says the answer is right"
    by_term = json.loads(rlctl("eval", *common, "reward.accuracy=term").stdout)
    assert (
        by_term["accuracy"] == 1.0
        and by_term["accuracy_counts"] == f"correct when reward term '{always}:score' scores ≥ 1"
    )
    judge = tmp_path / "judge.py"
    judge.write_text("def right(completion, answer):\n    return False\n")
    assert json.loads(rlctl("eval", *common, f"reward.accuracy={judge}:right").stdout)["accuracy"] == 0.0
    bad = rlctl("eval", *common, "reward.accuracy=exactly")
    assert bad.returncode == 1 and "reward.accuracy: must be auto, term, one of the rules" in bad.stderr
