"""PPO's pieces and the variants' options, checked against values worked out by hand."""

import math

import pytest
import torch

from rlctl.algos import AdvantageInputs, Algorithm, advantages, kl, losses, shaping

# --- value loss -------------------------------------------------------------------------------------


def test_clipped_value_loss_on_hand_worked_tokens():
    # Token 0: V = 1.0 moved from old 0.5 by 0.5 > c = 0.2, so V_clip = 0.7; R = 2:
    #   (1 − 2)² = 1, (0.7 − 2)² = 1.69 -> max 1.69.
    # Token 1: V = 0.1, old 0, inside the clip; R = 0: (0.1)² = 0.01 both -> 0.01.
    values, old, returns = torch.tensor([[1.0, 0.1]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 0.0]])
    loss, stats = losses.clipped_value_loss(values, old, returns, torch.ones(1, 2), value_clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.01) / 2)
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)


def test_clipped_value_loss_stops_the_gradient_when_the_clipped_error_is_larger():
    # V moved past the clip away from R: the clipped term (constant in V) is the max -> zero gradient.
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, _ = losses.clipped_value_loss(values, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert values.grad.item() == 0.0
    # Inside the clip the gradient is (V − R) = −1.9 for V = 0.1, R = 2.
    values = torch.tensor([[0.1]], requires_grad=True)
    loss, _ = losses.clipped_value_loss(values, torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert values.grad.item() == pytest.approx(-1.9)


# --- adaptive KL controller ---------------------------------------------------------------------------


def test_adaptive_kl_raises_beta_above_target_and_lowers_it_below():
    # KL = 2×target: error clipped to +0.2; n/horizon = 100/1000 -> β·(1 + 0.02).
    assert kl.adaptive_kl_coef(0.1, 0.2, 0.1, horizon=1000, n_steps=100) == pytest.approx(0.1 * 1.02)
    # KL = 0.95×target: error −0.05 -> β·(1 − 0.005).
    assert kl.adaptive_kl_coef(0.1, 0.095, 0.1, horizon=1000, n_steps=100) == pytest.approx(0.1 * 0.995)
    # On target: unchanged.
    assert kl.adaptive_kl_coef(0.1, 0.1, 0.1, horizon=1000, n_steps=100) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        kl.adaptive_kl_coef(0.1, 0.1, 0.0, horizon=1000)


def test_algorithm_keeps_a_fixed_beta_without_a_target():
    assert Algorithm(kl_coef=0.05).next_kl_coef(0.05, 10.0, 64) == 0.05
    assert Algorithm(kl_coef=0.05, kl_target=0.01, kl_horizon=640).next_kl_coef(0.05, 10.0, 64) == pytest.approx(
        0.05 * 1.02
    )


# --- per-token rewards and process rewards ------------------------------------------------------------


def test_score_goes_on_the_last_valid_token_minus_the_kl_in_the_reward():
    scores = torch.tensor([1.0, 2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl_t = torch.full((2, 3), 0.5)
    rewards = shaping.token_level_rewards(scores, mask, kl=kl_t, kl_coef=0.1)
    # −0.05 on every valid token; the score on token 1 (row 0) and token 2 (row 1); padding 0.
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.95, 0.0, -0.05, -0.05, 1.95])


def test_algorithm_places_the_kl_in_the_reward_only_when_configured():
    scores, mask = torch.tensor([1.0]), torch.ones(1, 2)
    logp, ref = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -1.5]])  # k1 = 1, 0.5
    in_reward = Algorithm(advantage="gae", group_size=1, kl_coef=0.1, kl_estimator="k1", kl_placement="in_reward")
    in_loss = Algorithm(advantage="gae", group_size=1, kl_coef=0.1, kl_estimator="k1", kl_placement="in_loss")
    assert in_reward.token_rewards(scores, mask, None, logp, ref, 0.1).flatten().tolist() == pytest.approx([-0.1, 0.95])
    assert in_loss.token_rewards(scores, mask, None, logp, ref, 0.1).flatten().tolist() == pytest.approx([0.0, 1.0])
    # ... and then the loss carries no KL term of its own.
    loss_r, _ = in_reward.loss(logp, logp, torch.zeros(1), mask, ref_logp=ref)
    loss_l, _ = in_loss.loss(logp, logp, torch.zeros(1), mask, ref_logp=ref)
    assert loss_r.item() == pytest.approx(0.0) and loss_l.item() == pytest.approx(0.1 * 0.75)


def test_gae_credits_each_reasoning_step_with_the_discounted_sum_of_later_rewards():
    # Three steps end on tokens 1, 3 and 5 with rewards 0.2, 0.3 and 1.0 (the final answer).
    step_rewards = torch.tensor([[0.0, 0.2, 0.0, 0.3, 0.0, 1.0]])
    mask = torch.ones(1, 6)
    rewards = shaping.token_level_rewards(torch.tensor([1.5]), mask, step_rewards=step_rewards)
    # V ≡ 0, λ = 1, γ = 0.5: A_t = Σ_{k ≥ t} γ^{k−t} r_k.
    adv, _ = advantages.gae(rewards, torch.zeros(1, 6), mask, gamma=0.5, lam=1.0)
    expected = [
        0.5 * 0.2 + 0.5**3 * 0.3 + 0.5**5 * 1.0,  # token 0
        0.2 + 0.5**2 * 0.3 + 0.5**4 * 1.0,  # token 1 ends step 1
        0.5 * 0.3 + 0.5**3 * 1.0,
        0.3 + 0.5**2 * 1.0,  # token 3 ends step 2
        0.5 * 1.0,
        1.0,  # token 5 ends step 3
    ]
    assert adv.flatten().tolist() == pytest.approx(expected)
    # With γ = 1 a step's advantage is its own reward plus every later one: steps stay distinguishable.
    adv1, _ = advantages.gae(rewards, torch.zeros(1, 6), mask, gamma=1.0, lam=1.0)
    assert adv1.flatten().tolist() == pytest.approx([1.5, 1.5, 1.3, 1.3, 1.0, 1.0])


def test_step_rewards_land_on_the_token_that_completes_their_character_offset(tokenizer):
    from rlctl.rollout.hf import step_rewards_to_tokens

    text_ids = tokenizer("ab\ncd\n", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([text_ids + [tokenizer.eos_token_id]])
    mask = torch.ones(ids.shape)
    pieces = [tokenizer.decode([t]) for t in text_ids]
    ends = [sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))]
    # A step ending at character 3 (after "ab\n") and the final score at the end of the text.
    placed = step_rewards_to_tokens(tokenizer, ids, mask, [[(3, 0.5), (6, 1.0)]])
    first_step_token = next(i for i, end in enumerate(ends) if end >= 3)
    assert placed[0, first_step_token].item() == pytest.approx(0.5)
    assert placed[0, -1].item() == pytest.approx(1.0)  # the end of the text goes to the last valid token (EOS)
    assert placed.sum().item() == pytest.approx(1.5)


def test_a_rule_returning_step_rewards_reaches_the_batch(tokenizer):
    from rlctl.rewards import RULES, WeightedRewards
    from rlctl.rewards.rules import Term

    def per_line(completion, answer):  # 0.5 at the end of every line that holds a digit
        offsets, position = [], 0
        for line in completion.split("\n"):
            position += len(line) + 1
            if any(ch.isdigit() for ch in line):
                offsets.append((position - 1, 0.5))
        return offsets

    RULES["per_line_test"] = per_line
    try:
        result = WeightedRewards([Term("per_line_test", 2.0, {}), Term("exact_number", 1.0, {})], accuracy_term=1)(
            ["1\nx\n3", "none"], ["1", "1"]
        )
    finally:
        del RULES["per_line_test"]
    # Row 0: two digit lines -> 2 × 0.5 × weight 2 = 2, plus exact_number 1 at the end = 3.
    assert result.scores.tolist() == [3.0, 0.0]
    assert result.steps[0] == [(1, 1.0), (5, 1.0), (5, 1.0)]


# --- DAPO pieces --------------------------------------------------------------------------------------


def test_overlong_penalty_is_zero_before_the_buffer_and_linear_inside_it():
    lengths = torch.tensor([10, 12, 14, 16])
    # L_max 16, buffer 4: start 12 -> 0, 0, (12 − 14)/4 = −0.5, −1.
    assert shaping.overlong_penalty(lengths, 16, 4).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert shaping.overlong_penalty(lengths, 16, 0).tolist() == [0.0] * 4


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert shaping.groups_with_signal(scores, 2).tolist() == [False, True, False]


# --- policy-loss options ------------------------------------------------------------------------------


def test_dual_clip_bounds_the_loss_for_negative_advantages():
    # ρ = e^{2} = 7.39 with A = −1: standard clipped loss max(7.39, 1.2) = 7.39; dual clip c = 3 bounds it at 3.
    logp = torch.tensor([[2.0]], requires_grad=True)
    loss, stats = losses.ppo_clip(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    assert logp.grad.item() == 0.0 and stats["clip_frac"].item() == 1.0
    # Positive advantages are untouched by the dual clip: ρ = 7.39, A = 1 -> −min(7.39, 1.2) = −1.2.
    loss, _ = losses.ppo_clip(
        torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1), dual_clip=3.0
    )
    assert loss.item() == pytest.approx(-1.2)


def test_gspo_uses_one_ratio_per_sequence():
    # Row 0 log-ratios 0.1 and −0.1 average to 0: s = 1, so the loss is −A = −1 even though each
    # token ratio alone would be clipped; row 1 log-ratio 0.5 (s = 1.6487 > 1 + ε) with A = 1: clipped.
    logp = torch.tensor([[0.1, -0.1], [0.5, 0.5]], requires_grad=True)
    adv = torch.tensor([1.0, 1.0])
    loss, stats = losses.gspo(logp, torch.zeros(2, 2), adv, torch.ones(2, 2), clip_low=3e-4, clip_high=4e-4)
    assert loss.item() == pytest.approx((-1.0 + -(1 + 4e-4)) / 2, rel=1e-6)
    loss.backward()
    # Row 0's gradient spreads −A·s/|y| = −0.5 to each token; row 1 is clipped -> 0.
    assert logp.grad[0].tolist() == pytest.approx([-0.25, -0.25]) and logp.grad[1].abs().sum() == 0
    assert stats["seq_ratio_mean"].item() == pytest.approx((1 + math.exp(0.5)) / 2)


def test_ppo_gae_advantages_are_whitened_over_valid_tokens():
    algo = Algorithm(advantage="gae", group_size=1, gamma=1.0, lam=1.0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = shaping.token_level_rewards(torch.tensor([1.0, 0.0]), mask)
    adv, returns = algo.advantages(AdvantageInputs(torch.tensor([1.0, 0.0]), mask, 1, rewards, torch.zeros(2, 3)))
    valid = adv[mask.bool()]
    assert valid.mean().abs().item() < 1e-6 and valid.std().item() == pytest.approx(1.0, rel=1e-4)
    assert returns.flatten().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert algo.needs_values and not Algorithm().needs_values


def test_the_overlong_penalty_lands_on_the_last_token_beside_step_rewards():
    # Steps reward tokens 1 and 3 with 0.2 and 1.0; the response is 4 of 6 tokens long and the
    # overlong penalty is −0.5. Step rewards replace the last-token score, but not the penalty:
    # r = [0, 0.2, 0, 1.0 − 0.5, 0, 0].
    step_rewards = torch.tensor([[0.0, 0.2, 0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    rewards = shaping.token_level_rewards(
        torch.tensor([0.7]), mask, step_rewards=step_rewards, length_penalty=torch.tensor([-0.5])
    )
    assert rewards.flatten().tolist() == pytest.approx([0.0, 0.2, 0.0, 0.5, 0.0, 0.0])
    # Through the algorithm: buffer 4 of max 8 tokens, length 6 -> penalty (4 − 6) / 4 = −0.5.
    algo = Algorithm(advantage="gae", group_size=1, overlong_buffer=4, max_new_tokens=8)
    penalty = algo.length_penalty(torch.tensor([6.0]))
    assert penalty.tolist() == [-0.5]
    mask8 = torch.tensor([[1.0] * 6 + [0.0] * 2])
    steps8 = torch.zeros(1, 8)
    steps8[0, 2] = 1.0
    rewards = algo.token_rewards(torch.tensor([1.0 - 0.5]), mask8, steps8, None, None, 0.0, penalty)
    assert rewards.flatten().tolist() == pytest.approx([0, 0, 1.0, 0, 0, -0.5, 0, 0])


@pytest.mark.parametrize(
    "field, value, message",
    [("dual_clip", 0.5, "dual_clip: must be > 1"), ("dual_clip", 1.0, "dual_clip: must be > 1"),
     ("kl_target", -1.0, "kl_target: must be > 0"), ("kl_target", 0.0, "kl_target: must be > 0"),
     ("kl_horizon", 0, "kl_horizon: must be > 0"), ("clip_low", 1.0, "clip_low: must be in [0, 1)"),
     ("lam", 1.5, "lam: must be in [0, 1]"), ("num_iterations", 0, "num_iterations: must be ≥ 1")],
)  # fmt: skip
def test_the_algorithm_refuses_values_outside_their_range_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Algorithm(**{field: value})


def test_old_logprobs_are_needed_whenever_a_step_makes_more_than_one_update():
    grpo = Algorithm()
    assert not grpo.needs_old_logprobs(updates_per_step=1)  # the sampling policy is the one being trained
    assert grpo.needs_old_logprobs(updates_per_step=2)  # e.g. 2 minibatches × 1 iteration
    ppo = Algorithm(advantage="gae", group_size=1, kl_coef=0.05, kl_placement="in_reward")
    assert ppo.needs_old_logprobs(updates_per_step=1)  # the KL in the reward is measured on the sampling policy
