"""What a new user tripped on, each made plain: a Ctrl-C acknowledged at once, wall time with
start-up, error text with brackets kept, the key at fault named, the dry run's micro-batches and
repeated prompts, runs without a final checkpoint or with a LoRA step checkpoint evaluated, preference
data picked with data=jsonl, a run without held-out data saying so, and help that lists only the
groups a command reads."""

from __future__ import annotations

import json
import re
import signal

import pytest
from test_cli import rlctl

from rlctl.checkpoint import StopRequest
from rlctl.cli import CONF_DIR
from rlctl.logging import seconds_since_start
from rlctl.optim.layout import BatchLayout


def test_ctrl_c_is_acknowledged_the_moment_it_arrives():
    said = []
    with StopRequest(acknowledge=said.append) as stop:
        stop._handle(signal.SIGINT, None)
        assert said == ["SIGINT: stopping after this step, then saving; Ctrl-C again to abandon it"]
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    assert seconds_since_start() > 0


def test_the_dry_run_says_how_an_uneven_minibatch_splits():
    # 2 prompts × 8 = 16 samples in micro-batches of 6: 6 + 6 + 4, not "6 samples, 3 per minibatch".
    layout = BatchLayout.derive(2, 8, 1, 0, 6, 1, 128, 16, fixed_accumulation=False)
    assert "micro-batches: 3 per minibatch of 16 samples: 6 + 6 + 4 (optim.micro_batch_size=6" in layout.describe()
    even = BatchLayout.derive(2, 8, 1, 0, 8, 1, 128, 16, fixed_accumulation=False)
    assert "micro-batches: 8 samples, 2 per minibatch (gradient accumulation 2)" in even.describe()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reward.fn=my_reward.py"], "error: reward.fn: expected 'path/to/file.py:function', got 'my_reward.py'"),
        (
            ["data.eval_fraction=1.5"],
            "error: data.eval_fraction: must be in [0, 1): the share of rows held out, got 1.5",
        ),
    ],
)
def test_the_key_at_fault_is_named(overrides, message):
    result = rlctl("train", *overrides, "dry_run=true", check=False)
    assert result.returncode == 1 and message in result.stderr


def test_more_prompts_a_step_than_there_are_is_a_warning():
    result = rlctl("train", "prompts_per_step=200", "dry_run=true")
    assert "data: 78 training prompts, 22 held-out" in result.stdout
    assert "warning: prompts_per_step=200 × 1 process(es) = 200 prompts a step, but there are 78 training prompts" in (
        result.stdout
    )


def test_error_text_in_brackets_is_printed_as_written(tmp_path):
    # Rich markup used to swallow "[char_offset, reward]" in the error of a reward function.
    reward = tmp_path / "steps.py"
    reward.write_text("def score(completion, answer):\n    raise ValueError('return [char_offset, reward] pairs')\n")
    result = rlctl("train", "recipe=smoke", f"reward.fn={reward}:score", "reward.on_error=stop", "eval.enabled=false",
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)  # fmt: skip
    assert result.returncode == 1 and "return [char_offset, reward] pairs" in result.stderr


@pytest.fixture(scope="module")
def unfinished_lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    rlctl("train", "recipe=smoke", "model.lora.r=4", "save_final=false", "eval.enabled=false", f"hydra.run.dir={run}")
    return run


def test_a_run_without_a_final_checkpoint_is_evaluated_from_its_latest(unfinished_lora_run):
    run = unfinished_lora_run
    assert not (run / "checkpoints" / "final").exists()
    result = rlctl("eval", f"model.path={run}", "rollout=hf")
    assert result.returncode == 0, result.stderr
    assert (
        f"model.path: {run} has no checkpoints/final (it stopped before its end); using its latest checkpoint, step-000002"
        in result.stderr
    )
    # Its policy/ holds the LoRA adapter alone: merged into the run's base model for the command.
    assert "holds a LoRA adapter; merged it into the run's base model random:tiny" in result.stderr
    assert json.loads(result.stdout)["n_prompts"] == 4
    report = rlctl("report", str(run))
    assert "no held-out results:" in report.stdout and "has no eval.json" in report.stdout


def test_preference_data_is_picked_with_data_jsonl_and_a_run_without_held_out_pairs_says_so(tmp_path):
    pairs = tmp_path / "one.jsonl"
    pairs.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    result = rlctl("rm", "model=tiny", "data=jsonl", f"data.path={pairs}", f"hydra.run.dir={tmp_path / 'rm'}")
    assert result.returncode == 0, result.stderr
    assert "no held-out pairs (1 for training" in result.stdout.replace("\n", " ")


@pytest.mark.parametrize("command", ["rm", "sft", "dpo"])
def test_help_lists_only_the_groups_a_command_reads_and_every_option_of_them(command):
    text = rlctl(command, "--help").stdout
    groups = dict(
        re.findall(r"^(\w+): (.+)$", text.split("== Configuration groups ==")[1].split("== Config ==")[0], re.M)
    )
    assert set(groups) == {"model", "data", "deepspeed", "logger"}  # no algo, reward, rollout, recipe
    for group in ("model", "deepspeed", "logger"):
        assert groups[group].split(", ") == sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")), group


def test_the_dry_run_refuses_what_the_real_run_refuses_before_loading_a_model(tmp_path):
    # Each of these used to print "config OK" in a dry run and fail seconds into the real run.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" + json.dumps({"q": "3+3?"}) + "\n")
    causal_lm = tmp_path / "lm"
    causal_lm.mkdir()
    (causal_lm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    cases = [
        (["data=jsonl", "data.path=missing.jsonl"], "error: data: file not found: missing.jsonl"),
        (["data.source=jsonl"], "error: data.path: the jsonl source needs a file"),
        (["reward.fn=missing.py:score"], "error: reward.fn: file not found: missing.py"),
        (["data=jsonl", f"data.path={rows}", "data.prompt_field=question"], f"error: data: row {rows}:2 has no field 'question'"),
        (["reward=model", f"reward.model_path={causal_lm}"], f"error: reward.model_path: '{causal_lm}' is not a reward model (LlamaForCausalLM"),
    ]  # fmt: skip
    for overrides, message in cases:
        result = rlctl("train", *overrides, "dry_run=true", check=False)
        assert result.returncode == 1 and message in result.stderr, (overrides, result.stderr)
        assert "config OK" not in result.stdout


def test_the_sample_table_says_which_answers_accuracy_counts_and_keeps_brackets():
    from rich.console import Console

    from rlctl.logging import samples_table

    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(samples_table([{"prompt": "What is 3 + 4?", "completion": "[bold]7[/bold]", "answer": "7",
                                  "reward": 1.0, "correct": False}], 1))  # fmt: skip
    text = console.export_text()
    assert "correct" in text and "[bold]7[/bold]" in text and " no " in text
