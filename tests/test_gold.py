"""Seeing reward over-optimisation: the gold reward beside the trained one (eval.gold), the warning,
checkpoints/best, and the judge trained from preference pairs (rlctl rm head=judge)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_architectures import compose_for
from test_cli import rlctl, rlctl_here
from test_rm import compose_rm, one_step_gradient

from rlctl.algos.preference import judge_loss, judge_pairwise_loss
from rlctl.build import config_warnings
from rlctl.evaluate import overoptimisation_warning

# --- the judge's loss ---------------------------------------------------------------------------


def test_the_judge_loss_and_its_gradient_by_hand():
    # V = 3, Yes = token 0, No = token 1. Chosen question's logits [1, 0, −1], rejected's [0, 2, 0].
    chosen = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = judge_loss(chosen, rejected, yes=0, no=1)
    z_c = math.e + 1 + math.exp(-1)  # the chosen side's softmax normaliser
    z_r = 1 + math.exp(2) + 1
    p_c, p_r = [math.e / z_c, 1 / z_c, math.exp(-1) / z_c], [1 / z_r, math.exp(2) / z_r, 1 / z_r]
    assert float(loss) == pytest.approx(0.5 * (-math.log(p_c[0]) - math.log(p_r[1])), rel=1e-12)
    loss.backward()
    # ½·(softmax − onehot(Yes)) on the chosen side, ½·(softmax − onehot(No)) on the rejected side
    torch.testing.assert_close(chosen.grad[0], 0.5 * torch.tensor([p_c[0] - 1, p_c[1], p_c[2]], dtype=torch.float64))
    torch.testing.assert_close(rejected.grad[0], 0.5 * torch.tensor([p_r[0], p_r[1] - 1, p_r[2]], dtype=torch.float64))


def test_the_pairwise_judge_loss_and_its_gradient_by_hand():
    # The same logits: the verdict margins are m_c = 1 − 0 = 1 and m_r = 0 − 2 = −2, so
    # L = −log σ(m_c − m_r) = log(1 + e^−3), and ∂L/∂m_c = −σ(−3) = −∂L/∂m_r. Only the Yes and No
    # logits move: ∂m/∂z_Yes = 1, ∂m/∂z_No = −1, and the third token gets nothing.
    chosen = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = judge_pairwise_loss(chosen, rejected, yes=0, no=1)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-3)), rel=1e-12)
    loss.backward()
    s = 1 / (1 + math.exp(3))  # σ(−3)
    torch.testing.assert_close(chosen.grad[0], torch.tensor([-s, s, 0.0], dtype=torch.float64))
    torch.testing.assert_close(rejected.grad[0], torch.tensor([s, -s, 0.0], dtype=torch.float64))


def test_the_pairwise_judge_loss_sees_only_the_difference_of_the_margins():
    # Adding the same amount to both sides' Yes logits (a prompt whose replies are all likelier right)
    # leaves the loss unchanged; the yes_no loss would move.
    chosen, rejected = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    shifted_c, shifted_r = chosen.clone(), rejected.clone()
    shifted_c[:, 1] += 3.0
    shifted_r[:, 1] += 3.0
    assert float(judge_pairwise_loss(shifted_c, shifted_r, 1, 2)) == pytest.approx(
        float(judge_pairwise_loss(chosen, rejected, 1, 2)), rel=1e-12
    )
    assert float(judge_loss(shifted_c, shifted_r, 1, 2)) != pytest.approx(float(judge_loss(chosen, rejected, 1, 2)))


@pytest.mark.parametrize("loss", [judge_loss, judge_pairwise_loss])
def test_the_judge_losses_sum_over_pairs(loss):
    chosen, rejected = torch.randn(3, 5), torch.randn(3, 5)
    whole = loss(chosen, rejected, 2, 4)
    parts = sum(loss(chosen[i : i + 1], rejected[i : i + 1], 2, 4) for i in range(3))
    assert float(whole) == pytest.approx(float(parts), rel=1e-6)


# --- the over-optimisation warning ----------------------------------------------------------------


def evaluations(rewards, golds):
    return [{"step": 4 * i, "reward": r, "gold": g} for i, (r, g) in enumerate(zip(rewards, golds))]


def test_the_warning_fires_once_the_best_gold_is_patience_evaluations_old_and_the_reward_above_it():
    # Evaluations at steps 0, 4, 8, 12: the gold is best at step 4 (0.30); at steps 8 and 12 the
    # trained reward (1.0, 3.5) is above its value at step 4 (−2.0) and the gold is lower (0.25).
    history = evaluations([-5.0, -2.0, 1.0, 3.5], [0.20, 0.30, 0.25, 0.25])
    assert overoptimisation_warning(history[:3], 2, "exact_number") is None  # one evaluation since the best
    line = overoptimisation_warning(history, 2, "exact_number")
    assert line is not None and "\n" not in line
    assert "since its best at step 4" in line and "reward -2.000 → 3.500 (+5.500)" in line
    assert "gold 0.300 → 0.250 (-0.050)" in line and "(exact_number)" in line
    assert overoptimisation_warning(history, 1, "exact_number").startswith("the trained reward rose")
    assert overoptimisation_warning(history, 3, "exact_number") is None  # only two evaluations since the best


def test_a_gold_that_zigzags_below_its_best_still_warns():
    # A GRPO run against a trained judge (2026-12-03): the gold peaked at step 8 (0.364), fell to
    # 0.045, came back to 0.136, while the judge's reward kept above its step-8 value (0.537).
    history = evaluations([0.50, 0.52, 0.537, 0.613, 0.625], [0.136, 0.227, 0.364, 0.045, 0.136])
    assert "since its best at step 8" in overoptimisation_warning(history, 2, "exact_number")
    # ... but not while the trained reward is back at or below where it was at the best gold
    assert overoptimisation_warning(evaluations([0.5, 0.537, 0.6, 0.53], [0.1, 0.364, 0.2, 0.1]), 2, "g") is None


def test_a_flat_gold_under_a_climbing_reward_warns():
    # PPO against a Bradley-Terry model (2026-11-24): the rule's accuracy stayed 0.091 while the learned reward rose.
    line = overoptimisation_warning(evaluations([-5.15, -1.0, 2.0, 3.83], [0.091] * 4), 2, "exact_number")
    assert "since its best at step 0" in line and "gold 0.091 → 0.091 (+0.000)" in line


def test_no_warning_when_both_rise_when_the_reward_falls_or_without_gold():
    assert overoptimisation_warning(evaluations([-5, -2, 1, 3], [0.1, 0.2, 0.3, 0.4]), 2, "g") is None  # monotone
    assert overoptimisation_warning(evaluations([3, 2, 1, 0], [0.4, 0.3, 0.2, 0.1]), 2, "g") is None  # both fall
    assert overoptimisation_warning(evaluations([1, 2, 3, 4], [None] * 4), 1, "g") is None  # no eval.gold
    assert overoptimisation_warning(evaluations([1, 2, 3], [0.1, 0.3, 0.2]), 2, "g") is None  # one since the best


# --- eval.gold and checkpoints/best in a run -------------------------------------------------------

GOLD_RUN = ("recipe=smoke", "steps=3", "eval.every=1", "eval.gold=exact_number", "reward.accuracy=exact_number",
            "reward.terms=[{name: format, weight: 1.0, pattern: '[0-9]'}]", "checkpoint.keep_best=gold",
            "checkpoint.every=1", "checkpoint.keep_last=5")  # fmt: skip


@pytest.fixture(scope="module")
def gold_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gold") / "run"
    result = rlctl("train", *GOLD_RUN, f"hydra.run.dir={run_dir}")
    return run_dir, result


def eval_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/accuracy" in r]


def test_every_evaluation_scores_the_gold_reward_beside_the_trained_one(gold_run):
    run_dir, result = gold_run
    rows = eval_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        # One greedy sample per prompt, accuracy by the exact-number rule: the gold (the same rule) is
        # its mean, and the trained reward (the format rule) is scored on the same samples.
        assert row["eval/gold_mean"] == pytest.approx(row["eval/accuracy"])
        assert 0 <= row["eval/reward_mean"] <= 1
    assert "gold exact_number" in result.stdout
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert {"gold_mean", "reward_mean"} <= set(evaluation["before"]) and "gold_mean" in evaluation["after"]
    assert (run_dir / "curves.png").stat().st_size > 0


def test_checkpoints_best_holds_the_policy_of_the_best_gold_evaluation(gold_run, tokenizer):
    from rlctl import models

    run_dir, _ = gold_run
    rows = eval_rows(run_dir)
    golds = [r["eval/gold_mean"] for r in rows]
    best_step = rows[golds.index(max(golds))]["step"]  # the first evaluation with the highest gold
    best = json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())
    assert best["step"] == best_step and best["by"] == "gold_mean" and best["value"] == pytest.approx(max(golds))
    assert json.loads((run_dir / "eval.json").read_text())["best"]["step"] == best_step
    weights = load_file(run_dir / "checkpoints" / "best" / "model.safetensors")
    if best_step == 0:  # the starting model, as build made it (engine.seed 0)
        expected = models.load_causal_lm("random:tiny", tokenizer, seed=0).state_dict()
    else:  # the resumable checkpoint of that step holds the same policy
        expected = load_file(run_dir / "checkpoints" / f"step-{best_step:06d}" / "policy" / "model.safetensors")
    assert set(weights) <= set(expected)
    for name, value in weights.items():
        assert torch.equal(value, expected[name]), name
    card = (run_dir / "checkpoints" / "best" / "README.md").read_text()
    assert f"This folder holds the policy of step {best_step}, the best by held-out gold_mean" in card


def test_rlctl_eval_says_which_policy_of_the_run_it_evaluates(gold_run):
    run_dir, _ = gold_run
    best = json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())
    final = rlctl("eval", f"model.path={run_dir}", "data.eval_size=2")
    assert "checkpoints/final, the policy at the end of training" in final.stderr
    assert f"was step {best['step']}: model.path={run_dir}/checkpoints/best" in final.stderr
    chosen = rlctl("eval", f"model.path={run_dir}/checkpoints/best", "data.eval_size=2")
    assert f"the policy of step {best['step']}, the best by held-out gold_mean" in chosen.stderr


def test_a_resumed_run_keeps_its_evaluations_and_its_best(gold_run):
    run_dir, _ = gold_run
    before = json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())
    rlctl("train", *GOLD_RUN, "steps=4", f"hydra.run.dir={run_dir}")
    state = json.loads((run_dir / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["evaluations"]] == [0, 1, 2, 3, 4]
    golds = [e["gold"] for e in state["evaluations"]]
    assert state["best"]["step"] == state["evaluations"][golds.index(max(golds))]["step"]
    assert state["best"]["value"] >= before["value"]


# --- mistakes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint.keep_best=gold"], "checkpoint.keep_best=gold: there is no gold reward; name one with eval.gold"),
        (["checkpoint.keep_best=reward", "eval.enabled=false"], "checkpoint.keep_best=reward: the best is picked by held-out evaluation"),
        (["checkpoint.keep_best=latest"], "checkpoint.keep_best: must be one of ['none', 'gold', 'reward']"),
        (["eval.gold=exactnumber"], "eval.gold: unknown reward 'exactnumber'"),
        (["eval.gold=reward_model"], "eval.gold: reward_model is scored with reward.model_path, which is not set"),
        (["eval.gold=exact_number", "eval.gold_patience=0"], "eval.gold_patience: must be ≥ 1"),
    ],
)  # fmt: skip
def test_gold_and_best_mistakes_get_one_line(overrides, message, tmp_path):
    result = rlctl_here("train", "recipe=smoke", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_a_gold_that_is_the_trained_reward_is_warned_about():
    (warning,) = config_warnings(compose_for("train", "tiny", "eval.gold=exact_number"), training=True)
    assert warning.startswith("eval.gold=exact_number is a term of the trained reward itself (weight 1)")
    assert config_warnings(compose_for("train", "tiny", "reward=judge", "eval.gold=exact_number"), training=True) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["head=judge", "judge_template=Is it right?"], "judge_template: must contain {completion} (form question) and no {answer}"),
        (["head=judge", "judge_form=conversation", "judge_template='Right? {answer}'"], "no {answer} (preference pairs hold"),
        (["head=judge", "judge_form=chat"], "judge_form: must be one of ['question', 'conversation'], got 'chat'"),
        (["head=judge", "margin=1"], "margin: a Bradley-Terry setting; head=judge trains the Yes/No answer"),
        (["head=judge", "center_rewards_coefficient=0.1"], "center_rewards_coefficient: a Bradley-Terry setting"),
        (["head=critic"], "head: must be one of ['scalar', 'judge'], got 'critic'"),
        (["head=judge", "judge_loss=hinge"], "judge_loss: must be one of ['pairwise', 'yes_no'], got 'hinge'"),
    ],
)  # fmt: skip
def test_judge_training_mistakes_get_one_line(overrides, message, tmp_path):
    result = rlctl_here("rm", "model.path=random:tiny", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


# --- rlctl rm head=judge -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["pairwise", "yes_no"])
def test_judge_micro_batches_give_the_update_of_the_whole_batch(loss, tmp_path):
    # 8 pairs in one micro-batch and in 3 + 3 + 2: each micro-batch's loss is its share of the mean.
    whole, whole_metrics = one_step_gradient(tmp_path / "a", "head=judge", f"judge_loss={loss}", "pairs_per_step=8",
                                             "optim.micro_batch_size=8")  # fmt: skip
    split, metrics = one_step_gradient(tmp_path / "b", "head=judge", f"judge_loss={loss}", "pairs_per_step=8",
                                       "optim.micro_batch_size=3")  # fmt: skip
    assert any(float(g.abs().max()) > 1e-4 for g in whole.values())
    assert metrics["loss/judge"] == pytest.approx(whole_metrics["loss/judge"], abs=1e-6)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", ["pairwise", "yes_no"])
def test_the_judge_step_loss_is_its_loss_on_the_two_questions_asked_by_hand(loss, tmp_path):
    # One pair: recompute the loss from the model before the update, asking both questions by hand:
    # pairwise −log σ(m_c − m_r) with m = z_Yes − z_No; yes_no ½(−log p_c(Yes) − log p_r(No)).
    from rlctl.rewards.judge import PAIR_TEMPLATES, fill_template, judge_prompt_ids, verdict_logits
    from rlctl.rm import build_rm, reply_text

    run = build_rm(compose_rm("engine.precision=no", "eval.enabled=false", "head=judge", "pairs_per_step=1"),
                   tmp_path, "")  # fmt: skip
    index = run.sampler.next_batch()[0]  # the pair the first step draws (the same seed in both builds)
    pair = run.objective.train_pairs.pairs[index]
    tokenizer = run.tokenizer
    questions = [judge_prompt_ids(tokenizer, fill_template(PAIR_TEMPLATES["question"], pair.prompt, reply_text(r)))
                 for r in (pair.chosen, pair.rejected)]  # fmt: skip
    assert questions == [run.objective.train_pairs.chosen_ids[index], run.objective.train_pairs.rejected_ids[index]]
    with torch.no_grad():
        logits = [verdict_logits(run.engine.model, [q], tokenizer.pad_token_id)[0] for q in questions]
    yes, no = run.objective.yes, run.objective.no
    if loss == "yes_no":
        expected = 0.5 * (-torch.log_softmax(logits[0], -1)[yes] - torch.log_softmax(logits[1], -1)[no])
    else:
        expected = -torch.nn.functional.logsigmoid((logits[0][yes] - logits[0][no]) - (logits[1][yes] - logits[1][no]))
    _, metrics = one_step_gradient(tmp_path / "step", "head=judge", f"judge_loss={loss}", "pairs_per_step=1")
    assert float(metrics["loss/judge"]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.integration
def test_a_trained_judge_is_a_reward_that_asks_its_own_question(tmp_path):
    from rlctl.rewards.judge import DEFAULT_TEMPLATES, JudgeReward, JudgeSpec

    run_dir = tmp_path / "judge"
    result = rlctl("rm", "model.path=random:tiny", "head=judge", "judge_form=conversation", "steps=2", "pairs_per_step=8",
                   "data.pairs_per_problem=1", f"hydra.run.dir={run_dir}")  # fmt: skip
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert {"pairwise_accuracy", "pairwise_accuracy/wrong_number", "pairwise_accuracy/rambling"} <= set(
        evaluation["after"]
    )
    assert "reward=judge reward.judge.model_path=" in result.stdout
    saved = json.loads((run_dir / "checkpoints" / "final" / "rlctl_judge.json").read_text())
    assert saved == {"form": "conversation", "template": "Is your answer correct? Answer Yes or No."}
    judge = JudgeReward(JudgeSpec(str(run_dir), None, None, 4, 1024), "random:tiny", "float32", False)
    assert (judge.spec.form, judge.spec.template) == (saved["form"], saved["template"])  # asked what it was taught
    other = JudgeReward(JudgeSpec(str(run_dir), "question", None, 4, 1024), "random:tiny", "float32", False)
    assert other.spec.template == DEFAULT_TEMPLATES["question"]  # another form: that form's default question
    assert "# A judge from " in (run_dir / "checkpoints" / "final" / "README.md").read_text()
    # and as the reward of a training run
    rlctl("train", "recipe=smoke", "reward=judge", f"reward.judge.model_path={run_dir}", "eval.gold=exact_number",
          f"hydra.run.dir={tmp_path / 'grpo'}")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["reward/judge"] < 1 for r in rows if "reward/judge" in r)


def test_the_conversation_form_continues_the_policys_chat(tokenizer):
    # The chat, the reply as the assistant's turn, the question as the next user turn, the assistant's
    # turn opened: SmolLM2's template written out by hand.
    from rlctl.rewards.judge import judge_ids

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]
    ids = judge_ids(tokenizer, "conversation", "Is your answer correct? Answer Yes or No.", chat, "7")
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n7<|im_end|>\n<|im_start|>user\nIs your answer correct? Answer Yes or No.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_a_warning_logged_at_an_evaluation_step_keeps_that_evaluation_in_the_curves(tmp_path):
    # The warning is its own metrics row at the evaluation's step: it must add to that row, not replace it.
    from rlctl.report import read_metrics

    rows = [{"step": 8, "reward/mean": 0.5}, {"step": 8, "eval/accuracy": 0.36, "eval/gold_mean": 0.36},
            {"step": 8, "eval/overoptimisation_warning": 1.0}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = read_metrics(tmp_path)
    assert row["eval/accuracy"] == 0.36 and row["eval/overoptimisation_warning"] == 1.0
