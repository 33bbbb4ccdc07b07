"""`rlctl sft`: which tokens the loss covers (by hand, on a two-turn chat), the worked answers,
packing and micro-batches against the plain layout, the data's mistakes, and the run end to end
on the tiny model with its final model trained further by `rlctl train`."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from stage_helpers import gradient_of_update
from test_cli import rlctl, rlctl_here

from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.data.demonstrations import (
    DemonstrationSpec,
    demonstration_from_row,
    encode_demonstration,
    encode_demonstrations,
    worked_sum,
)
from rlctl.data.prompts import PromptFormat
from rlctl.data.sources import SourceSpec
from rlctl.errors import RlctlError
from rlctl.sft import TokenBatch, build_sft, sequence_nll

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_only_the_assistant_turns_and_their_end_tokens_are_trained(tokenizer):
    ids, mask = encode_demonstration(tokenizer, TWO_TURNS)
    tokens = [tokenizer.decode([i]) for i in ids]
    # The chat template renders
    #   <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n
    #   <|im_start|>assistant\n[Hello!<|im_end|>]\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[4<|im_end|>]\n
    # and the bracketed tokens, the replies and the end-of-turn token that stops each, are the trained ones:
    # not the system or user text, not the "assistant\n" headers, not the "\n" the template adds after <|im_end|>.
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
        "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    trained = [i for i, m in enumerate(mask) if m]
    assert [tokens[i] for i in trained] == ["Hello", "!", "<|im_end|>", "4", "<|im_end|>"]
    first_reply = tokens.index("Hello")
    assert trained == [first_reply, first_reply + 1, first_reply + 2, len(ids) - 3, len(ids) - 2]
    assert tokenizer.decode(ids[:first_reply]).endswith("<|im_start|>assistant\n")
    assert tokens[-1] == "\n" and mask[-1] == 0


def test_a_preference_reply_trains_only_itself_not_the_prompts_assistant_turns(tokenizer):
    _, every_turn = encode_demonstration(tokenizer, TWO_TURNS)
    _, last_only = encode_demonstration(tokenizer, TWO_TURNS, first_trained=4)
    assert sum(every_turn) == 5 and sum(last_only) == 2  # "4", "<|im_end|>"
    assert last_only[-3:] == [1, 1, 0]


def _trained_positions(tokenizer, row):
    source, fmt = SourceSpec(prompt_field="prompt"), PromptFormat()
    spec = DemonstrationSpec(completion_field="completion", messages_field="messages", max_tokens=256, pack=False)
    demo = demonstration_from_row(row, "f:1", source, fmt, spec)
    encoded = encode_demonstrations([demo], tokenizer, spec.max_tokens)
    ids, mask = encoded.ids[0], encoded.masks[0]
    return [i for i, m in enumerate(mask) if m], [tokenizer.decode([i]) for i in ids]


def test_a_prompt_completion_row_trains_its_completion_only_a_messages_row_every_assistant_turn(tokenizer):
    # The same conversation, two row formats. Rendered by the chat template (token positions from 0):
    #   0 <|im_start|> 1 system ... the default system turn ... <|im_start|> user \n Hi <|im_end|> \n
    #   <|im_start|> assistant \n [Hello ! <|im_end|>] \n <|im_start|> user \n 2 + 2 ? <|im_end|> \n
    #   <|im_start|> assistant \n [4 <|im_end|>] \n
    # As prompt/completion ("Hi"/"Hello!"/"2+2?" are the prompt, "4" the completion) only "4 <|im_end|>",
    # the two tokens before the final "\n", are trained: positions n−3 and n−2. As messages every
    # assistant turn is: "Hello", "!", "<|im_end|>" of the first reply as well.
    row_messages = {"messages": TWO_TURNS[1:]}
    row_prompt = {"prompt": TWO_TURNS[1:4], "completion": "4"}
    every_turn, tokens = _trained_positions(tokenizer, row_messages)
    completion_only, same_tokens = _trained_positions(tokenizer, row_prompt)
    assert tokens == same_tokens  # one token sequence; only the masks differ
    n, first_reply = len(tokens), tokens.index("Hello")
    assert completion_only == [n - 3, n - 2]
    assert [tokens[i] for i in completion_only] == ["4", "<|im_end|>"]
    assert every_turn == [first_reply, first_reply + 1, first_reply + 2, n - 3, n - 2]
    assert [tokens[i] for i in every_turn] == ["Hello", "!", "<|im_end|>", "4", "<|im_end|>"]


def test_without_a_chat_template_replies_end_in_eos_and_only_they_are_trained(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else tokenizer
    plain.chat_template = None
    ids, mask = encode_demonstration(plain, TWO_TURNS[1:3])
    trained = plain.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Hello!" + plain.eos_token
    assert plain.decode(ids).endswith("user: Hi\nassistant: Hello!" + plain.eos_token)


@pytest.mark.parametrize(
    "operands, text",
    [
        ([23, 48], "23 + 48: 3 + 8 = 11, write 1 carry 1; 2 + 4 + 1 = 7; so 71"),  # the example
        ([99, 99], "99 + 99: 9 + 9 = 18, write 8 carry 1; 9 + 9 + 1 = 19; so 198"),  # the last carry leads
        ([50, 50], "50 + 50: 0 + 0 = 0; 5 + 5 = 10; so 100"),
        ([3, 4], "3 + 4: 3 + 4 = 7; so 7"),
    ],
)
def test_worked_sums_by_hand(operands, text):
    assert worked_sum(operands) == text


def test_rows_as_messages_or_prompt_and_completion_and_bad_rows_named():
    source, fmt = SourceSpec(answer_field="answer"), PromptFormat(system_prompt="S")
    spec = DemonstrationSpec(completion_field="completion", messages_field="messages", max_tokens=64, pack=False)
    demo = demonstration_from_row(
        {"prompt": "Q", "completion": "A", "answer": "7"}, "f:1", SourceSpec(prompt_field="prompt"), fmt, spec
    )
    assert demo.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                             {"role": "assistant", "content": "A"}] and demo.answer == "7"  # fmt: skip
    assert demo.prompt == demo.messages[:2]
    chat = demonstration_from_row({"messages": TWO_TURNS}, "f:2", source, fmt, spec)
    assert chat.messages == TWO_TURNS and chat.answer is None
    with pytest.raises(RlctlError, match=r"row f:3 has no field 'completion'"):
        demonstration_from_row({"question": "Q"}, "f:3", source, fmt, spec)
    with pytest.raises(RlctlError, match=r"row f:4: the conversation in 'messages' has no assistant turn"):
        demonstration_from_row({"messages": TWO_TURNS[:2]}, "f:4", source, fmt, spec)


def test_packed_rows_give_the_loss_and_gradient_of_padded_ones(tiny_model, tokenizer):
    # Three demonstrations of different lengths, packed into one row (attention kept per
    # demonstration by the restarting positions) or right-padded one per row: the same NLL sum,
    # token count and gradient, since each token sees exactly the same context either way.
    demos = [encode_demonstration(tokenizer, TWO_TURNS[:3]), encode_demonstration(tokenizer, TWO_TURNS),
             encode_demonstration(tokenizer, [TWO_TURNS[3], TWO_TURNS[4]])]  # fmt: skip
    batch = TokenBatch([d[0] for d in demos], [d[1] for d in demos])
    results = []
    for pack_tokens in (0, 512):
        tiny_model.zero_grad()
        nll, tokens = sequence_nll(tiny_model, batch, tokenizer.pad_token_id, pack_tokens, _no_autocast)
        nll.backward()
        results.append(
            (float(nll.detach()), float(tokens), {n: p.grad.clone() for n, p in tiny_model.named_parameters()})
        )
    (padded, padded_tokens, padded_grad), (packed, packed_tokens, packed_grad) = results
    assert padded_tokens == packed_tokens == 5 + 2 + 3
    assert packed == pytest.approx(padded, rel=1e-5)
    for name, grad in padded_grad.items():
        torch.testing.assert_close(packed_grad[name], grad, atol=1e-6, rtol=1e-4)


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def compose_sft(*overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("sft", overrides=["model.path=random:tiny", "logger.console=false", "engine.precision=no",
                                         "eval.enabled=false", *overrides])  # fmt: skip


def one_step_gradient(tmp_path, *overrides):
    """The gradient the first step's update applies, and the step's metrics."""
    return gradient_of_update(build_sft(compose_sft(*overrides), tmp_path, ""))


@pytest.mark.integration
def test_micro_batches_and_packing_give_the_update_of_the_whole_batch(tmp_path):
    # 6 demonstrations as one micro-batch, as 4 + 2 (uneven), and packed 4 + 2: each micro-batch's
    # loss is its share of the 6 demonstrations' token mean, so the gradient is the same.
    whole, whole_metrics = one_step_gradient(tmp_path / "a", "examples_per_step=6", "optim.micro_batch_size=6")
    for name, overrides in (
        ("split", ["optim.micro_batch_size=4"]),
        ("packed", ["optim.micro_batch_size=4", "data.pack=true"]),
    ):
        split, metrics = one_step_gradient(tmp_path / name, "examples_per_step=6", *overrides)
        assert metrics["loss/sft"] == pytest.approx(whole_metrics["loss/sft"], rel=1e-5)
        for key, value in whole.items():
            torch.testing.assert_close(split[key], value, atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    result = rlctl("sft", "model=tiny", "steps=3", "examples_per_step=4", "optim.micro_batch_size=2",
                   "data.eval_size=4", "eval.max_new_tokens=8", "checkpoint.every=2", f"hydra.run.dir={run_dir}")  # fmt: skip
    return run_dir, result


def test_sft_writes_eval_json_curves_and_a_final_causal_lm(sft_run):
    from transformers import AutoModelForCausalLM

    run_dir, result = sft_run
    evaluation = json.loads((run_dir / "eval.json").read_text())
    for when in ("before", "after"):
        assert evaluation[when]["n_demonstrations"] == 4 and evaluation[when]["n_prompts"] == 4
        assert evaluation[when]["loss"] > 0 and 0 <= evaluation[when]["accuracy"] <= 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/sft" in r] == [1, 2, 3]
    for name in ("curves.png", "config.yaml", "checkpoints/final/README.md", "checkpoints/step-000003"):
        assert (run_dir / name).exists(), name
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final")
    assert "held-out loss" in result.stdout and "rlctl train model.path=" in result.stdout


def test_the_sft_model_trains_further_with_rl(sft_run, tmp_path):
    run_dir, _ = sft_run
    out = tmp_path / "grpo"
    result = rlctl("train", "recipe=smoke", f"model.path={run_dir}/checkpoints/final", f"hydra.run.dir={out}")
    # the task format the SFT model was taught comes along: its instruction and its reward rule
    assert "settings from" in result.stderr and "sft" in result.stderr
    config = (out / "config.yaml").read_text()
    assert "column by column" in config and "name: gsm8k" in config
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]) == 2


def test_a_rollout_option_on_the_command_line_keeps_the_sft_runs_length_and_format(sft_run):
    # The SFT run's eval.max_new_tokens=8 is the length its answers were taught to take. Choosing
    # rollout=hf (as users without vLLM do) sets the backend, not the length: 8 stays, not hf's 16.
    run_dir, _ = sft_run
    result = rlctl("train", f"model.path={run_dir}/checkpoints/final", "rollout=hf", "dry_run=true")
    assert result.returncode == 0, result.stderr
    assert "rollout.max_new_tokens=8" in result.stderr and "data.instruction=" in result.stderr
    assert "from the command line: rollout=hf" in result.stderr
    assert "+ 8 new tokens" in result.stdout  # the batch layout's longest micro-batch: prompt + 8 new tokens


def test_eval_of_an_sft_run_scores_it_on_the_task_it_was_taught(sft_run):
    # Its config's data group holds sft-only keys (completion_field): eval used to stop with a ConfigKeyError.
    run_dir, _ = sft_run
    result = rlctl("eval", f"model.path={run_dir}", "rollout=hf")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["response_len_mean"] <= 8  # the SFT run's eval.max_new_tokens
    assert "rollout.max_new_tokens=8" in result.stderr


def test_dpo_and_rm_runs_are_evaluated_or_answered_in_one_line(tmp_path):
    # rlctl eval of a non-RL run: an SFT run's keys (data.completion_field) used to be a ConfigKeyError.
    from rlctl.cli import task_settings_of

    sft = {"examples_per_step": 8, "data": {"source": "arithmetic", "digits": 2, "completion_field": "completion"},
           "reward": {"terms": [{"name": "gsm8k", "weight": 1.0, "pattern": None}]}, "eval": {"max_new_tokens": 64}}  # fmt: skip
    settings = task_settings_of(tmp_path, sft)
    assert settings["data"] == {"source": "arithmetic", "digits": 2} and settings["rollout"] == {"max_new_tokens": 64}
    dpo = {"loss_type": "sigmoid", "beta": 0.1, "data": {"source": "arithmetic", "digits": 1, "pairs_per_problem": 4},
           "eval": {"max_new_tokens": 16}}  # fmt: skip
    settings = task_settings_of(tmp_path, dpo)
    assert settings["data"] == {"source": "arithmetic", "digits": 1}
    assert settings["reward"]["terms"][0]["name"] == "exact_number" and settings["rollout"] == {"max_new_tokens": 16}
    with pytest.raises(RlctlError, match=r"is a reward model \(rlctl rm\), not a policy.*reward.model_path="):
        task_settings_of(tmp_path, {"margin": 0.0, "pairs_per_step": 16, "data": {"source": "arithmetic"}})


def test_sft_resumes_where_it_stopped(sft_run):
    run_dir, _ = sft_run
    result = rlctl("sft", "model=tiny", "steps=4", "examples_per_step=4", "optim.micro_batch_size=2",
                   "data.eval_size=4", "eval.max_new_tokens=8", "checkpoint.every=2", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert "resumed from" in result.stdout and "step-000003" in result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/sft" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data=jsonl"], "data.path: the jsonl source of rlctl sft needs a JSONL file"),
        (["data.operators=*"], "data.operators: the built-in demonstrations are worked additions"),
        (["optim.minibatch_size=4"], "optim.minibatch_size: rlctl sft makes one update"),
        (["examples_per_step=0"], "examples_per_step: must be ≥ 1"),
        (["data.max_tokens=2"], "data.max_tokens: must be ≥ 8"),
    ],
)
def test_sft_mistakes_get_one_line(overrides, message, tmp_path):
    result = rlctl_here("sft", "model=tiny", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_a_bad_demonstration_file_is_named_with_its_row(tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q", "answer": "a"}\n')
    result = rlctl_here("sft", "model=tiny", "data=jsonl", f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0 and f"row {data}:2 has no field 'completion'" in result.stderr
