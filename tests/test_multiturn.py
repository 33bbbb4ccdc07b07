"""Multi-turn rollouts: environments, the calculator, token in / token out, observation masking,
limits, and the equivalence of a trajectory with observations to the same trained tokens without."""

import json
import time

import pytest
import torch

from rlctl.algos import ops
from rlctl.algos.advantages import gae
from rlctl.batch import concat, reward_chats
from rlctl.envs import CalculatorEnvironment, EnvSpec, Step, Task, ToolEnvironment, environment_factory
from rlctl.envs.calculator import calculator, evaluate_expression
from rlctl.errors import RlctlError
from rlctl.optim.update import minibatch_counts
from rlctl.rollout import SamplingParams
from rlctl.rollout.hf import Sampled
from rlctl.rollout.multiturn import EnvironmentRollout

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'


class Scripted:
    """A rollout backend that 'samples' scripted replies: reply(row, turn) -> text, encoded and
    ended with EOS; or token ids given as a list (to test what the tokenizer would not write)."""

    gives_logprobs = False

    def __init__(self, tokenizer, reply, max_new_tokens=64):
        self.tokenizer, self.reply = tokenizer, reply
        self.params = SamplingParams(backend="hf", max_new_tokens=max_new_tokens)
        self.eos_ids = [tokenizer.eos_token_id]
        self.calls = []  # the sequences each turn was asked to continue

    def with_params(self, params):
        return self

    def load_weights_of(self, policy):
        pass

    def complete(self, policy, sequences, max_new_tokens):
        self.calls.append(sequences)
        made = []
        for row, _ in enumerate(sequences):
            text = self.reply(row, len(self.calls) - 1)
            ids = (
                text
                if isinstance(text, list)
                else self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.eos_ids
            )
            ids = ids[:max_new_tokens]
            made.append(Sampled(ids, None, ids[-1] in self.eos_ids))
        return made


def rollout_of(tokenizer, reply, env=CalculatorEnvironment, **spec):
    backend = Scripted(tokenizer, reply, spec.pop("max_new_tokens", 64))
    return EnvironmentRollout(backend, tokenizer, env, EnvSpec(name="calculator", **spec)), backend


QUESTION = [{"role": "user", "content": "What is 123 * 45 + 6?"}]


# --- the calculator --------------------------------------------------------------------------------


def test_calculator_works_out_arithmetic_exactly_by_hand():
    assert calculator("123 * 45 + 6") == "5541"  # 5535 + 6
    assert calculator("(12 + 3) * 4") == "60"
    assert calculator("-3 × 4 − 1") == "-13"  # the symbols a model may write
    assert calculator("7 / 4") == "1.75"
    assert calculator("1 / 3") == "0.333333"
    assert evaluate_expression("0.1 + 0.2") == evaluate_expression("3 / 10")  # exact, not binary floats


@pytest.mark.parametrize("expression", ["2 ** 8", "__import__('os')", "x + 1", "abs(-1)", "[1]", "1 if 1 else 2", ""])
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ValueError):
        evaluate_expression(expression)


def test_calculator_division_by_zero_is_an_error_not_a_crash():
    with pytest.raises(ValueError, match="division by zero"):
        evaluate_expression("1 / (2 - 2)")


# --- tool calls ------------------------------------------------------------------------------------


def test_a_tool_call_returns_the_result_as_a_tool_message():
    step = CalculatorEnvironment().step("Let me compute. " + CALL % "12 * 7")
    assert step == Step([{"role": "tool", "content": "84"}], done=False, tool_calls=1, tool_errors=0)


def test_a_reply_without_a_tool_call_is_the_final_answer():
    assert CalculatorEnvironment().step("The answer is 84.").done


@pytest.mark.parametrize(
    ("call", "said"),
    [
        ("<tool_call>not json</tool_call>", "not JSON"),
        ('<tool_call>{"name": "abacus", "arguments": {}}</tool_call>', "no tool named 'abacus'"),
        ('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>', "unexpected keyword"),
        (CALL % "2 ** 100", "ValueError: only numbers"),
    ],
)
def test_a_broken_tool_call_gets_its_error_back_and_is_counted(call, said):
    step = CalculatorEnvironment().step(call)
    assert not step.done and step.tool_calls == 1 and step.tool_errors == 1
    assert said in step.messages[0]["content"] and step.messages[0]["role"] == "tool"


def test_a_tool_that_hangs_returns_a_timeout_error_and_the_episode_goes_on():
    def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "done"

    env = ToolEnvironment([slow], timeout_s=0.2)
    started = time.monotonic()
    step = env.step('<tool_call>{"name": "slow", "arguments": {"seconds": 2}}</tool_call>')
    assert time.monotonic() - started < 1.5
    assert step.tool_errors == 1 and "took longer than 0.2 s" in step.messages[0]["content"] and not step.done


def test_tools_are_described_in_the_system_message_after_the_datas_own():
    env = CalculatorEnvironment()
    first = env.reset(Task([{"role": "system", "content": "Be brief."}, *QUESTION], "5541"))
    assert first[0]["role"] == "system" and first[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert '"name": "calculator"' in first[0]["content"] and first[1:] == QUESTION


def test_a_tool_without_type_hints_or_docstring_is_refused_in_one_line():
    def bare(x):
        return x

    with pytest.raises(RlctlError, match="tool 'bare' needs type hints"):
        ToolEnvironment([bare])


# --- token in, token out ---------------------------------------------------------------------------


def two_turns(row, turn):
    return ("I will use the tool. " + CALL % "123 * 45 + 6") if turn == 0 else "The answer is 5541."


def test_a_trajectory_is_the_chat_templates_rendering_of_the_whole_conversation(tokenizer):
    rollout, _ = rollout_of(tokenizer, two_turns)
    batch = rollout.generate(None, [[0]], ["5541"], 1, conversations=[QUESTION])
    conversation = batch.conversations[0]
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "tool", "assistant"]
    assert conversation[3]["content"] == "5541" and batch.completions == ["The answer is 5541."]
    ours = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    rendered = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    # The template closes the last turn with "<|im_end|>\n"; the trajectory stops at the EOS the policy sampled.
    assert rendered[: len(ours)] == ours and tokenizer.decode(rendered[len(ours) :]) == "\n"
    assert batch.env_stats["drift"].tolist() == [0.0]
    assert batch.env_stats["turns"].tolist() == [2.0] and batch.env_stats["tool_calls"].tolist() == [1.0]


def test_only_the_sampled_tokens_are_trained_and_the_observation_only_attended(tokenizer):
    rollout, _ = rollout_of(tokenizer, two_turns)
    batch = rollout.generate(None, [[0]], ["5541"], 1, conversations=[QUESTION])
    response = batch.input_ids[0, -batch.response_length :]
    attended = batch.attention_mask[0, -batch.response_length :].bool()
    trained = batch.response_mask[0].bool()
    eos = tokenizer.eos_token_id
    reply_ids = [tokenizer(two_turns(0, t), add_special_tokens=False)["input_ids"] + [eos] for t in (0, 1)]
    assert response[trained].tolist() == reply_ids[0] + reply_ids[1]
    observation = response[attended & ~trained]
    assert tokenizer.decode(observation) == "\n<|im_start|>tool\n5541<|im_end|>\n<|im_start|>assistant\n"
    assert int(batch.env_stats["observation_tokens"][0]) == len(observation)


def test_the_sampled_tokens_are_kept_even_when_the_text_would_tokenise_otherwise(tokenizer):
    """A hand-made reply whose tokens are not the tokenizer's own split of its text: the trajectory keeps
    them (never re-encoded), and the drift diagnostic counts the trajectory."""
    odd = (
        tokenizer(" ans", add_special_tokens=False)["input_ids"]
        + tokenizer("wer", add_special_tokens=False)["input_ids"]
    )
    assert tokenizer(" answer", add_special_tokens=False)["input_ids"] != odd  # the case is real for this tokenizer
    sampled = tokenizer("The", add_special_tokens=False)["input_ids"] + odd + [tokenizer.eos_token_id]
    rollout, _ = rollout_of(tokenizer, lambda row, turn: sampled)
    batch = rollout.generate(None, [[0]], ["1"], 1, conversations=[QUESTION])
    assert batch.input_ids[0, -batch.response_length :][batch.response_mask[0].bool()].tolist() == sampled
    assert batch.completions == ["The answer"] and batch.env_stats["drift"].tolist() == [1.0]


def test_every_turn_asks_the_backend_once_for_every_live_trajectory(tokenizer):
    # rows 0 and 2 call the tool once, rows 1 and 3 answer at once: turn 2 continues two sequences, not four
    rollout, backend = rollout_of(tokenizer, lambda row, turn: two_turns(row, turn) if row % 2 == 0 or turn else "No.")
    batch = rollout.generate(None, [[0], [0]], ["5541", "5541"], 2, conversations=[QUESTION, QUESTION])
    assert [len(c) for c in backend.calls] == [4, 2]
    assert batch.env_stats["turns"].tolist() == [2.0, 1.0, 2.0, 1.0]
    assert batch.group_ids.tolist() == [0, 0, 1, 1]


# --- limits ----------------------------------------------------------------------------------------


def test_an_environment_that_wants_more_turns_than_allowed_ends_flagged_truncated(tokenizer):
    rollout, _ = rollout_of(tokenizer, lambda row, turn: CALL % "1 + 1", max_turns=2)
    batch = rollout.generate(None, [[0]], ["2"], 1, conversations=[QUESTION])
    assert batch.env_stats["turns"].tolist() == [2.0] and batch.env_stats["truncated"].tolist() == [1.0]


def test_a_reply_cut_by_the_token_limit_ends_the_trajectory_flagged(tokenizer):
    rollout, _ = rollout_of(tokenizer, two_turns, max_new_tokens=5)
    batch = rollout.generate(None, [[0]], ["5541"], 1, conversations=[QUESTION])
    assert batch.env_stats["truncated"].tolist() == [1.0] and batch.env_stats["turns"].tolist() == [1.0]
    assert int(batch.response_mask.sum()) == 5


def test_a_long_observation_is_cut_keeping_the_next_assistant_header(tokenizer):
    # a 24-digit result: one token per digit, more than 12 with the tool's header and the assistant's
    rollout, _ = rollout_of(tokenizer, lambda row, turn: CALL % "99999999 * 99999999 * 99999999" if turn == 0 else "Done.",
                            max_observation_tokens=12)  # fmt: skip
    batch = rollout.generate(None, [[0]], ["1"], 1, conversations=[QUESTION])
    response = batch.input_ids[0, -batch.response_length :]
    observation = response[batch.attention_mask[0, -batch.response_length :].bool() & ~batch.response_mask[0].bool()]
    assert len(observation) == 12 and tokenizer.decode(observation).endswith("<|im_start|>assistant\n")
    assert batch.env_stats["observations_cut"].tolist() == [1.0]


def test_the_total_budget_bounds_replies_and_observations_together(tokenizer):
    rollout, _ = rollout_of(tokenizer, lambda row, turn: CALL % "1 + 1", max_turns=10, max_total_tokens=100)
    batch = rollout.generate(None, [[0]], ["2"], 1, conversations=[QUESTION])
    assert int(batch.attention_mask[0, -batch.response_length :].sum()) <= 100
    assert batch.env_stats["truncated"].tolist() == [1.0]


def test_mask_truncated_drops_flagged_trajectories_from_the_loss(tokenizer):
    reply = lambda row, turn: (CALL % "1 + 1") if row == 0 else "2"  # noqa: E731
    rollout, _ = rollout_of(tokenizer, reply, max_turns=1, mask_truncated=True)
    batch = rollout.generate(None, [[0]], ["2"], 2, conversations=[QUESTION])
    assert batch.env_stats["truncated"].tolist() == [1.0, 0.0]
    assert batch.response_mask[0].sum() == 0 and batch.response_mask[1].sum() > 0


# --- the equivalence: observations in the middle change nothing that is trained ---------------------


def _with_observation(x: torch.Tensor, at: int, width: int, fill: float) -> torch.Tensor:
    return torch.cat([x[:, :at], torch.full((x.shape[0], width), fill, dtype=x.dtype), x[:, at:]], dim=1)


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
def test_observation_tokens_change_no_loss_no_advantage_and_get_no_gradient(agg):
    """Two rows of 5 trained tokens (the second with 3 valid) against the same rows with 4 observation
    tokens after token 2, holding junk values that must not matter."""
    from rlctl.algos import Algorithm

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    logp, old, ref = (torch.randn(2, 5) * 0.3 - 1 for _ in range(3))
    values, rewards = torch.randn(2, 5), torch.zeros(2, 5)
    rewards[0, 4], rewards[1, 2], rewards[0, 1] = 1.0, -0.5, 0.25  # scores on the last tokens, a turn reward
    algo = Algorithm(advantage="gae", loss_agg=agg, kl_coef=0.1, entropy_coef=0.01, gamma=0.9, lam=0.8)

    def run(at=None, width=0):
        spread = (lambda x, fill: x) if at is None else (lambda x, fill: _with_observation(x, at, width, fill))
        m = spread(mask, 0.0)
        lp = spread(logp, 7.0).detach().requires_grad_(True)
        adv, ret = gae(spread(rewards, 3.0), spread(values, 5.0), m, algo.gamma, algo.lam)
        totals = algo.totals(*minibatch_counts(m))  # as the trainer counts them: trained tokens, longest trained row
        loss, _ = algo.loss(
            lp, spread(old, -9.0), adv, m, spread(ref, 2.0), spread(torch.ones(2, 5), 4.0), totals=totals
        )
        value_loss, _ = algo.critic_loss(spread(values, 5.0) + 0.1, spread(values, 5.0), ret, m, totals)
        loss.backward()
        keep = m.bool()
        return loss.detach(), value_loss.detach(), adv[keep], ret[keep], lp.grad

    plain, spread = run(), run(at=3, width=4)
    torch.testing.assert_close(spread[0], plain[0], rtol=0, atol=1e-6)  # the policy loss (with KL and entropy)
    torch.testing.assert_close(spread[1], plain[1], rtol=0, atol=1e-6)  # the value loss
    torch.testing.assert_close(spread[2], plain[2], rtol=0, atol=1e-6)  # GAE advantages on trained tokens
    torch.testing.assert_close(spread[3], plain[3], rtol=0, atol=1e-6)  # returns
    assert torch.equal(spread[4][:, 3:7], torch.zeros(2, 4))  # exactly no gradient at the observation
    torch.testing.assert_close(torch.cat([spread[4][:, :3], spread[4][:, 7:]], 1), plain[4], rtol=0, atol=1e-7)


def test_trimming_keeps_observation_columns_that_the_mask_does_not_cover(tokenizer):
    rollout, _ = rollout_of(tokenizer, two_turns)
    batch = rollout.generate(None, [[0]], ["5541"], 1, conversations=[QUESTION])
    padded = concat([batch, batch.with_()], tokenizer.pad_token_id)
    assert padded.trimmed().attention_mask.sum() == padded.attention_mask.sum()
    assert padded.conversations == batch.conversations * 2 and padded.env_stats["turns"].tolist() == [2.0, 2.0]
    assert padded.rows(torch.tensor([1])).env_stats["tool_calls"].tolist() == [1.0]


def test_rewards_see_every_message_before_the_final_reply(tokenizer):
    rollout, _ = rollout_of(tokenizer, two_turns)
    batch = rollout.generate(None, [[0]], ["5541"], 1, conversations=[QUESTION])
    chat = reward_chats(batch, [QUESTION], 1)[0]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool"]


# --- a user's environment --------------------------------------------------------------------------

GUESS = '''
from rlctl.envs import Step


class GuessTheNumber:
    """The policy guesses a number from 1 to 100; each wrong guess is answered "higher" or "lower"."""

    def reset(self, task):
        self.secret = int(task.answer)
        return [{"role": "user", "content": "Guess my number from 1 to 100. Reply with one number."}]

    def step(self, reply):
        digits = "".join(c for c in reply if c.isdigit())
        if not digits:
            return Step([{"role": "user", "content": "Reply with one number."}], done=False)
        guess = int(digits)
        if guess == self.secret:
            return Step(done=True, reward=1.0)
        hint = "higher" if guess < self.secret else "lower"
        return Step([{"role": "user", "content": hint}], done=False)
'''


def test_a_users_class_from_a_file_plays_turns_with_per_turn_rewards(tmp_path, tokenizer):
    (tmp_path / "guess.py").write_text(GUESS)
    make = environment_factory(EnvSpec(name="custom", cls=f"{tmp_path}/guess.py:GuessTheNumber"))
    guesses = ["50", "25", "37"]
    rollout, _ = rollout_of(tokenizer, lambda row, turn: guesses[turn], env=make, max_turns=4)
    batch = rollout.generate(None, [[0]], ["37"], 1, conversations=[QUESTION])
    hints = [m["content"] for m in batch.conversations[0] if m["role"] == "user"][1:]
    assert hints == ["lower", "higher"] and batch.env_stats["turns"].tolist() == [3.0]
    # the reward lands on the last token of the turn that earned it: the EOS of the third reply
    assert batch.turn_rewards.sum() == 1.0
    last_trained = int(batch.response_mask[0].nonzero().max())
    assert batch.turn_rewards[0, last_trained] == 1.0


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("class E:\n    def reset(self, task):\n        return []\n", "E has no step method"),
        (
            "class E:\n    def __init__(self, level):\n        pass\n    def reset(self, t): pass\n    def step(self, r): pass\n",
            "must be callable with no arguments",
        ),
        ("def E():\n    pass\n", "defines no class 'E'"),
        ("raise ImportError('no such thing')\n", "importing"),
    ],
)
def test_a_class_that_cannot_be_an_environment_is_refused_in_one_line(tmp_path, source, said):
    (tmp_path / "env.py").write_text(source)
    with pytest.raises(RlctlError, match=said):
        environment_factory(EnvSpec(name="custom", cls=f"{tmp_path}/env.py:E"))


def test_a_step_that_returns_no_messages_is_refused_naming_the_class(tmp_path, tokenizer):
    (tmp_path / "env.py").write_text(
        "class E:\n    def reset(self, task):\n        return task.messages\n    def step(self, reply):\n        return 'ok'\n"
    )
    rollout, _ = rollout_of(tokenizer, two_turns, env=environment_factory(EnvSpec(cls=f"{tmp_path}/env.py:E")))
    with pytest.raises(RlctlError, match=r"env: E.step must return rlctl.envs.Step"):
        rollout.generate(None, [[0]], ["1"], 1, conversations=[QUESTION])


def test_a_step_that_raises_ends_that_episode_flagged_and_the_others_go_on(tmp_path, tokenizer):
    (tmp_path / "env.py").write_text(
        "class E:\n    def reset(self, task):\n        return task.messages\n"
        "    def step(self, reply):\n        if 'boom' in reply:\n            raise KeyError('boom')\n        return [], True\n"
    )
    rollout, _ = rollout_of(tokenizer, lambda row, turn: "boom" if row == 0 else "fine",
                            env=environment_factory(EnvSpec(cls=f"{tmp_path}/env.py:E")))  # fmt: skip
    batch = rollout.generate(None, [[0]], ["1"], 2, conversations=[QUESTION])
    assert batch.env_stats["step_errors"].tolist() == [1.0, 0.0] and batch.env_stats["truncated"].tolist() == [1.0, 0.0]
    assert batch.env_errors[0] == "env: E.step raised KeyError: 'boom'" and batch.env_errors[1] == ""


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ({"name": "abacus"}, "unknown environment 'abacus'"),
        ({"name": "custom"}, "set env.cls"),
        ({"name": "calculator", "cls": "x.py:E"}, "give one"),
    ],
)
def test_env_names_are_checked(spec, said):
    with pytest.raises(RlctlError, match=said):
        environment_factory(EnvSpec(**spec))


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_turns: must be ≥ 1"):
        EnvSpec(name="calculator", max_turns=0)


# --- end to end on the tiny model ------------------------------------------------------------------

ECHO = (
    "env=custom",
    f"env.cls={__file__.rsplit('/', 1)[0]}/echo_env.py:Echo",
    "rollout.max_new_tokens=8",
    "env.max_turns=3",
)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_training_with_observations_between_replies_runs_resumes_and_generates(tmp_path, algo, ending_model_path):
    from test_cli import rlctl

    run = tmp_path / "run"
    echo = (*ECHO, f"model.path={ending_model_path}")
    rlctl("train", "recipe=smoke", f"algo={algo}", *echo, f"hydra.run.dir={run}")
    steps = [r for r in _metrics(run) if "env/turns" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # three replies of ≤ 8 tokens with "again" between them: observations are there, and attended
    assert all(r["env/observation_tokens"] > 0 and 1 < r["env/turns"] <= 3 for r in steps)
    assert all(r["response_len/mean"] <= 24 for r in steps)  # trained tokens: the replies only
    resumed = rlctl("train", "recipe=smoke", f"algo={algo}", *echo, "steps=3", f"resume={run}",
                    f"hydra.run.dir={tmp_path / 'more'}")  # fmt: skip
    assert "step 3/3" in resumed.stdout
    shown = rlctl("generate", f"model.path={run}", "num_prompts=1")
    assert "conversation (env)" in shown.stdout and "[user] again" in shown.stdout


@pytest.mark.integration
def test_calculator_env_trains_with_lora_and_evaluates(tmp_path):
    from test_cli import rlctl

    run = tmp_path / "run"
    rlctl("train", "recipe=smoke", "env=calculator", "rollout.max_new_tokens=32", "model.lora.r=4",
          f"hydra.run.dir={run}")  # fmt: skip
    steps = [r for r in _metrics(run) if "reward/mean" in r]
    assert len(steps) == 2 and all("env/tool_calls" in r and "env/drift" in r for r in steps)
    evaluated = rlctl("eval", f"model.path={run}", "eval.n_samples=1")  # the run's environment comes with it
    assert "env.name=calculator" in evaluated.stderr and '"accuracy"' in evaluated.stdout


# --- checks before the run, and during it ----------------------------------------------------------


def test_a_chat_template_that_rewrites_its_prefix_is_refused(tokenizer):
    import copy

    unstable = copy.deepcopy(tokenizer)
    # the count of messages comes first: every new message changes the rendering's beginning
    unstable.chat_template = (
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rollout, _ = rollout_of(unstable, two_turns)
    with pytest.raises(RlctlError, match="does not render a conversation as the prefix of its continuation"):
        rollout.generate(None, [[0]], ["5541"], 1, conversations=[QUESTION])


def test_a_reply_limit_too_small_for_one_tool_call_is_refused_before_training(tokenizer):
    from rlctl.build import environment_prompt_tokens

    make = environment_factory(EnvSpec(name="calculator"))
    with pytest.raises(
        RlctlError, match=r"rollout.max_new_tokens=8: too small for one tool call of CalculatorEnvironment"
    ):
        environment_prompt_tokens(make, tokenizer, True, SamplingParams(max_new_tokens=8), Task(QUESTION, "5541"))
    # enough: what the environment's first messages add to a prompt (the tool's description) is counted
    assert (
        environment_prompt_tokens(make, tokenizer, True, SamplingParams(max_new_tokens=64), Task(QUESTION, "5541"))
        > 100
    )


def test_the_largest_trajectory_is_every_reply_and_observation_at_its_limit():
    assert EnvSpec(name="calculator").total_tokens(64) == 4 * 64 + 3 * 64  # replies, and observations between them
    assert EnvSpec(name="calculator", max_total_tokens=100).total_tokens(64) == 100
    assert (
        EnvSpec(name="calculator", max_total_tokens=10_000).total_tokens(64) == 448
    )  # never more than the turns allow
    assert "≤ 448 tokens after its prompt" in EnvSpec(name="calculator").describe(64)


def test_per_turn_rewards_land_on_their_turns_and_add_to_the_score(tmp_path, tokenizer):
    from types import SimpleNamespace

    from rlctl.sampling import _with_steps

    (tmp_path / "guess.py").write_text(GUESS)
    make = environment_factory(EnvSpec(cls=f"{tmp_path}/guess.py:GuessTheNumber"))
    rollout, _ = rollout_of(tokenizer, lambda row, turn: ["50", "37"][turn], env=make)
    batch = rollout.generate(None, [[0]], ["37"], 1, conversations=[QUESTION])
    answer_score = torch.tensor([2.0])  # what the reward terms gave the final reply
    placed = _with_steps(SimpleNamespace(tokenizer=tokenizer), batch, None, answer_score).step_rewards
    last = int(batch.response_mask[0].nonzero().max())
    assert placed[0, last] == 1.0 + 2.0  # the turn's reward and the answer's score, on the last trained token
    assert placed.sum() == 3.0


def test_every_tool_call_failing_for_max_failed_steps_stops_the_run(tokenizer, tmp_path):
    from types import SimpleNamespace

    from rlctl.checkpoint import TrainState
    from rlctl.sampling import check_environment

    messages = []
    s = SimpleNamespace(logger=SimpleNamespace(message=messages.append), max_failed_reward_steps=2, run_dir=tmp_path)

    def played(reply):  # a fresh scripted backend per step: its turns count from 0
        return rollout_of(tokenizer, reply)[0].generate(None, [[0]], ["1"], 2, conversations=[QUESTION])

    def failing(row, turn):
        return CALL % "2 ** 9" if turn == 0 else "1"  # powers: refused by the calculator

    state = TrainState()
    check_environment(s, state, played(failing))
    assert state.consecutive_tool_failures == 1
    check_environment(s, state, played(two_turns))
    assert state.consecutive_tool_failures == 0  # one step with a working call starts the count again
    check_environment(s, state, played(failing))
    with pytest.raises(RlctlError, match="every tool call failed for 2 steps in a row"):
        check_environment(s, state, played(failing))


def test_the_dry_run_says_how_long_a_trajectory_can_be():
    from test_cli import rlctl

    shown = rlctl("train", "env=calculator", "rollout.max_new_tokens=64", "dry_run=true").stdout
    assert "multi-turn: env calculator, ≤ 4 replies of ≤ 64 tokens" in shown
    assert "(128 prompt + 448 new tokens)" in shown  # micro-batches are sized for the largest trajectory


TOOLS = '''
def lookup(word: str) -> str:
    """The dictionary entry of a word.

    Args:
        word: the word to look up
    """
    return {"cat": "a small animal"}.get(word, "not found")


def undocumented(word):
    return word
'''


def test_tools_given_as_functions_in_a_file_are_called_by_name(tmp_path, tokenizer):
    (tmp_path / "tools.py").write_text(TOOLS)
    make = environment_factory(EnvSpec(name="tools", tools=[f"{tmp_path}/tools.py:lookup"]))
    call = '<tool_call>{"name": "lookup", "arguments": {"word": "cat"}}</tool_call>'
    rollout, _ = rollout_of(tokenizer, lambda row, turn: call if turn == 0 else "A small animal.", env=make)
    batch = rollout.generate(None, [[0]], ["1"], 1, conversations=[QUESTION])
    assert batch.conversations[0][3] == {"role": "tool", "content": "a small animal"}
    assert '"name": "lookup"' in batch.conversations[0][0]["content"]  # its schema, from the docstring


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ({"name": "tools"}, "list the tools"),
        ({"name": "tools", "tools": ["TOOLS/tools.py:undocumented"]}, "tool 'undocumented' needs type hints"),
        ({"name": "tools", "tools": ["TOOLS/tools.py:nothing"]}, "defines no function 'nothing'"),
        ({"name": "calculator", "tools": ["TOOLS/tools.py:lookup"]}, "tools are for env=tools"),
    ],
)
def test_tools_that_cannot_be_used_are_refused_in_one_line(tmp_path, spec, said):
    (tmp_path / "tools.py").write_text(TOOLS)
    spec = {**spec, "tools": [t.replace("TOOLS", str(tmp_path)) for t in spec.get("tools", [])]}
    with pytest.raises(RlctlError, match=said):
        environment_factory(EnvSpec(**spec))
