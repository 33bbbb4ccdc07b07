"""The command line, end to end on the tiny model: the console script's ``main`` with a user's
arguments, in this process, or in a subprocess where a fresh interpreter matters."""

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "COLUMNS": "200"}


def rlctl(*args, cwd=None, check=True, timeout=600, isolated=False):
    """`rlctl ARGS`, as the console script runs it: inside this process (:func:`rlctl_here`), or
    with ``isolated`` in a subprocess of its own, for what depends on a fresh interpreter (help,
    sweeps, W&B, one end-to-end proof that a mistake gives one line and no traceback)."""
    if isolated:
        result = subprocess.run(
            [sys.executable, "-m", "rlctl", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout
        )
    else:
        result = rlctl_here(*args, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"rlctl {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def rlctl_here(*args, cwd=None) -> Finished:
    """`rlctl ARGS` run inside this process: the same ``main`` as the console script, without the
    ~10 s of interpreter start-up and imports a subprocess costs on a 2-core CPU. What it prints is
    captured; a traceback, from rlctl or Hydra, lands in stderr as it would."""
    from hydra.core.global_hydra import GlobalHydra

    from rlctl.cli import main

    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    columns, folder = os.environ.get("COLUMNS"), os.getcwd()
    os.environ["COLUMNS"] = "200"  # as ENV gives a subprocess: rich wraps nothing a test looks for
    GlobalHydra.instance().clear()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(folder)
        sys.argv = argv
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
        GlobalHydra.instance().clear()
    return Finished(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    # A reward the random tiny model earns now and then (its samples contain "ing" in about a
    # quarter of cases with this seed), so the advantages are not all zero and the weights move.
    result = rlctl("train", "recipe=smoke", "reward.terms=[{name: format, pattern: ing}]", f"hydra.run.dir={run_dir}")
    return run_dir, result


def test_train_smoke_writes_the_run_folder(smoke_run):
    run_dir, result = smoke_run
    assert {"config.yaml", "metrics.jsonl", "eval.json", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    required = {"reward/mean", "reward/std", "accuracy", "kl", "loss/policy", "clip_frac", "entropy", "response_len/mean",
                "grad_norm", "lr", "time/rollout_s", "time/reward_s", "time/ref_s", "time/update_s", "time/step_s",
                "throughput/tokens_per_s"}  # fmt: skip
    assert required <= set(steps[0]), required - set(steps[0])
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert {"accuracy", "reward_mean"} <= set(evaluation["before"]) and {"accuracy", "reward_mean"} <= set(
        evaluation["after"]
    )
    assert "step 2/2" in result.stdout and "samples at step 1" in result.stdout


def test_the_final_checkpoint_loads_with_transformers_and_changed_from_init(smoke_run):
    run_dir, _ = smoke_run
    final = run_dir / "checkpoints" / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(final)
    from rlctl.models import load_causal_lm, load_tokenizer

    initial = load_causal_lm("random:tiny", load_tokenizer("random:tiny"), seed=0)
    changed = [
        not torch.equal(p, initial.state_dict()[name])
        for name, p in trained.state_dict().items()
        if name in initial.state_dict()
    ]
    assert any(changed), "two optimiser steps with non-zero advantages left every weight unchanged"


def test_eval_and_generate_accept_the_checkpoint(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    final = run_dir / "checkpoints" / "final"
    out = tmp_path / "eval.json"
    rlctl("eval", f"model.path={final}", "data.eval_size=4", "rollout.max_new_tokens=4", "eval.n_samples=3",
          "eval.temperature=1.0", "eval.pass_k=[1,3]", f"output={out}")  # fmt: skip
    results = json.loads(out.read_text())
    assert {"accuracy", "reward_mean", "pass@1", "pass@3"} <= set(results) and results["n_prompts"] == 4
    assert results["pass@3"] >= results["pass@1"]
    generated = rlctl("generate", f"model.path={final}", "prompts=[What is 2 + 2?]", "n=2", "rollout.max_new_tokens=4")
    assert "What is 2 + 2?" in generated.stdout and "2 completions" in generated.stdout


def test_cfg_job_prints_the_composed_config():
    out = rlctl("train", "algo=rloo", "--cfg", "job", isolated=True).stdout
    assert "advantage: rloo" in out and "path: embedded:smollm2-135m" in out


@pytest.mark.integration
def test_help_lists_the_config_groups_and_recipes_lists_files():
    out = rlctl("train", "--help", isolated=True).stdout
    for group in ("algo:", "model:", "data:", "reward:", "rollout:", "logger:", "recipe:"):
        assert group in out
    algo_line = next(line for line in out.splitlines() if line.startswith("algo:"))
    assert "grpo" in algo_line and "ppo" in algo_line and "rlctl train:" in out
    recipes = rlctl("recipes", isolated=True).stdout
    assert "smoke" in recipes and "tiny random model" in recipes


@pytest.mark.integration
def test_multirun_sweeps_two_values_into_two_folders(tmp_path):
    result = rlctl("train", "-m", "recipe=smoke", "steps=1", "optim.lr=1e-5,3e-5", "eval.enabled=false", "save_final=false",
          "logger.sample_every=0", f"hydra.sweep.dir={tmp_path}", isolated=True)  # fmt: skip
    for job in ("0", "1"):
        assert (tmp_path / job / "metrics.jsonl").exists()
    lrs = [json.loads((tmp_path / j / "metrics.jsonl").read_text().splitlines()[-1])["lr"] for j in ("0", "1")]
    assert lrs == pytest.approx([1e-5, 3e-5])
    # the sweep ends with a table comparing the jobs
    assert (
        f"sweep {tmp_path}" in result.stdout and "optim.lr=1e-05" in result.stdout and "optim.lr=3e-05" in result.stdout
    )


def test_the_run_ends_with_curves_and_a_model_card(smoke_run):
    run_dir, result = smoke_run
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run_dir / "checkpoints" / "final" / "README.md").read_text()
    assert "base_model: random:tiny" in card and "| accuracy |" in card
    assert "rlctl train recipe=smoke" in card  # the command that reproduces the run
    again = rlctl("report", str(run_dir))
    assert "curves:" in again.stdout and '"after"' in again.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo=ppo2"], "Could not find 'algo/ppo2'"),
        (
            ["algo.advantage=ppo2"],
            "unknown advantage estimator 'ppo2'; known: ['gae', 'grpo', 'reinforce', 'reinforce_pp', 'rloo']",
        ),
        (["reward.terms=[{name: exact}]"], "unknown reward 'exact'; known:"),
        (["optim.lrr=1"], "Key 'lrr' not in 'OptimConfig'"),
        (["data=jsonl", "data.path=/nonexistent/train.jsonl"], "file not found: /nonexistent/train.jsonl"),
        (["algo.group_size=1"], "needs group_size ≥ 2"),
        (["model.path=/nonexistent/model"], "model.path: no such folder: /nonexistent/model"),
        (["optim.lr=-1"], "optim.lr: must be a positive number"),
        (["optim.minibatch_size=3"], "optim.minibatch_size: 3 does not divide"),
        (["deepspeed=zero2", "deepspeed.stage=5"], "deepspeed.stage: ZeRO stages are 0, 1, 2 and 3, got 5"),
        (["algo.dual_clip=0.5"], "algo.dual_clip: must be > 1"),
        (["algo.kl_target=-1"], "algo.kl_target: must be > 0"),
        (["algo=ppo", "critic.path=/nope"], "critic.path: no such folder: /nope"),
        (["rollout.max_new_tokens=0"], "rollout.max_new_tokens: must be ≥ 1, got 0"),
        (["eval.n_samples=2", "eval.pass_k=[4]"], "eval.pass_k: every k must be between 1 and eval.n_samples=2"),
    ],
)
def test_bad_input_gets_one_clear_line_and_no_traceback(overrides, message, tmp_path):
    result = rlctl_here("train", "recipe=smoke", f"hydra.run.dir={tmp_path}", *overrides)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "overrides, updates",
    [
        ([], 1),
        (["recipe=gsm8k-grpo-qwen1.5b"], 2),
        (["recipe=smoke", "optim.minibatch_size=4", "algo.num_iterations=2"], 4),
    ],
)
def test_dry_run_prints_the_batch_layout_without_loading_a_model(tmp_path, overrides, updates):
    # The GSM8K recipe names Qwen2.5-1.5B, which cannot be downloaded here: a dry run that loaded
    # weights would fail. 32 prompts × 8 = 256 samples in minibatches of 128: 2 updates.
    result = rlctl("train", "dry_run=true", *overrides, cwd=tmp_path)
    assert f"optimiser updates per step: {updates}" in result.stdout
    for line in (
        "prompts per step:",
        "samples per step:",
        "minibatches:",
        "micro-batches:",
        "largest micro-batch:",
        "prompts: run once per micro-batch",
    ):
        assert line in result.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no empty run folder


def test_config_errors_come_before_any_model_loads(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from rlctl import models
    from rlctl.build import build_train
    from rlctl.cli import CONF_DIR
    from rlctl.config import register_schemas
    from rlctl.errors import RlctlError

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(models, "load_causal_lm", no_loading)
    monkeypatch.setattr(models, "load_tokenizer", no_loading)
    monkeypatch.setattr(models, "load_value_model", no_loading)
    register_schemas()
    for overrides, message in ((["algo.dual_clip=0.5"], "algo.dual_clip"), (["algo.kl_target=-1"], "algo.kl_target"),
                               (["algo=ppo", "critic.path=/nope"], "critic.path"), (["optim.schedule=cosin"], "optim.schedule"),
                               (["data=jsonl", "data.path=/nope.jsonl"], "data")):  # fmt: skip
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("train", overrides=["recipe=smoke", "logger.console=false", *overrides])
        with pytest.raises(RlctlError, match=f"^{message}: "):
            build_train(cfg, tmp_path)


def test_a_row_without_the_prompt_field_is_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"text": "2+2?", "answer": "4"}\n')
    result = rlctl_here("train", "recipe=smoke", f"hydra.run.dir={tmp_path / 'run'}", "data=jsonl", f"data.path={data}")
    assert result.returncode == 1 and f"{data}:2 has no field 'prompt'" in result.stderr


def test_overlong_prompts_are_reported_not_fatal(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)] + [
        {"prompt": "long " * 300, "answer": "0"}
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = rlctl("train", "recipe=smoke", "steps=1", "data=jsonl", f"data.path={data}", "data.eval_path=" + str(data),
                   "data.max_prompt_tokens=100", f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert "1 training prompts skipped" in result.stdout
    assert (
        json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["data/prompts_skipped"] == 1
    )  # the held-out set is the first 4 rows


@pytest.mark.integration
def test_wandb_logger_works_offline(tmp_path):
    rlctl("train", "recipe=smoke", "logger=wandb", "steps=1", "eval.enabled=false", "save_final=false",
          f"hydra.run.dir={tmp_path}", isolated=True)  # fmt: skip
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline_runs and any(offline_runs[0].glob("*.wandb"))


def test_gsm8k_trains_offline_from_a_local_jsonl(tmp_path):
    rlctl("train", "recipe=smoke", "data=gsm8k", "reward=gsm8k", "steps=1", "data.path=../shared/data/gsm8k/test.jsonl",
          "data.eval_size=2", f"hydra.run.dir={tmp_path}")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "reward/mean" in r)
    assert rows[0]["data/train_prompts"] > 1000 and {"reward/gsm8k", "reward/format"} <= set(step)
