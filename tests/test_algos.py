"""The algorithm core, checked against values worked out by hand and against the limits of the math."""

import math

import pytest
import torch

from rlctl.algos import ADVANTAGE_ESTIMATORS, AdvantageInputs, Algorithm, advantages, kl, losses, ops

# --- ops --------------------------------------------------------------------------------------------


def test_masked_mean_ignores_masked_entries_and_survives_an_empty_mask():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert ops.masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    assert ops.masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert ops.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten_gives_zero_mean_unit_variance_over_valid_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ops.masked_whiten(x, mask)
    # valid entries 1,2,3: mean 2, unbiased var 1 -> whitened -1, 0, 1; the masked entry is zeroed.
    assert w.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)


def test_aggregations_on_a_hand_worked_example():
    # Sequence 0 has tokens 1, 3 (valid), sequence 1 has the single token 5.
    loss = torch.tensor([[1.0, 3.0, 9.0], [5.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert ops.aggregate(loss, mask, "token-mean").item() == pytest.approx((1 + 3 + 5) / 3)  # 3
    assert ops.aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 5) / 2)  # 3.5
    assert ops.aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((4 + 5) / 2)  # 4.5
    # Dr.GRPO: all token sums over B·L with the padded length L = 3 -> 9 / 6, or a given L = 10 -> 9 / 20.
    assert ops.aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(9 / 6)
    assert ops.aggregate(loss, mask, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(9 / 20)
    with pytest.raises(KeyError, match="token-mean"):
        ops.aggregate(loss, mask, "mean")


def test_a_token_mean_over_two_parts_is_one_mean_over_all_tokens_not_a_mean_of_means():
    # Part A holds 1 token of loss 4, part B 3 tokens of loss 0. Over all 4 tokens: 4 / 4 = 1.
    # A mean of the parts' own means would give (4 + 0) / 2 = 2: the bug of per-rank denominators.
    loss_a, mask_a = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    loss_b, mask_b = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    totals = ops.AggregationTotals(tokens=4, sequences=2, length=3)
    share_a = ops.aggregate(loss_a, mask_a, "token-mean", totals=totals)  # 4 / 4
    share_b = ops.aggregate(loss_b, mask_b, "token-mean", totals=totals)  # 0 / 4
    assert (share_a + share_b).item() == pytest.approx(1.0)
    # seq-mean-token-mean: sequence means 4 and 0 over S = 2 sequences -> 2; seq-mean-token-sum the same;
    # seq-mean-token-sum-norm: token sums 4 + 0 over S·L = 2·3 -> 2/3.
    for mode, expected in (
        ("seq-mean-token-mean", 2.0),
        ("seq-mean-token-sum", 2.0),
        ("seq-mean-token-sum-norm", 4 / 6),
    ):
        parts = ops.aggregate(loss_a, mask_a, mode, totals=totals) + ops.aggregate(loss_b, mask_b, mode, totals=totals)
        assert parts.item() == pytest.approx(expected), mode


@pytest.mark.parametrize("mode", ops.AGGREGATIONS)
def test_shares_of_any_split_add_up_to_the_aggregate_of_the_whole(mode):
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1  # every row has at least one token, rows of unequal length
    whole = ops.aggregate(loss, mask, mode, norm_length=5)
    totals = ops.AggregationTotals.of(mask, norm_length=5)
    for cuts in ([0, 2, 4, 6], [0, 1, 6], [0, 5, 6]):  # equal and unequal splits
        parts = sum(ops.aggregate(loss[i:j], mask[i:j], mode, totals=totals) for i, j in zip(cuts, cuts[1:]))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6), cuts


# --- advantages -------------------------------------------------------------------------------------


def test_reinforce_is_the_raw_reward():
    assert advantages.reinforce(torch.tensor([1.0, 0.0, 0.5])).tolist() == [1.0, 0.0, 0.5]


def test_grpo_on_a_hand_worked_group():
    # Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(((.5)^2·4)/3) = sqrt(1/3) = 0.57735.
    a = advantages.grpo(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, eps=0.0)
    expected = 0.5 / math.sqrt(1 / 3)
    assert a.tolist() == pytest.approx([expected, -expected, -expected, expected], rel=1e-6)


def test_grpo_advantages_have_zero_mean_within_each_group():
    torch.manual_seed(0)
    scores = torch.rand(24)
    for scale in (True, False):
        a = advantages.grpo(scores, group_size=6, scale_by_std=scale).view(4, 6)
        assert a.mean(dim=1).abs().max().item() < 1e-6


def test_grpo_gives_zero_advantage_to_a_group_with_equal_rewards():
    a = advantages.grpo(torch.tensor([1.0, 1.0, 0.0, 1.0]), group_size=2)
    assert a[:2].tolist() == [0.0, 0.0]


def test_grpo_batch_std_divides_every_group_by_the_std_of_the_whole_step():
    # TRL's scale_rewards="batch". Two groups [1, 0] and [1, 1]: group means 0.5 and 1, so the centred
    # rewards are [0.5, −0.5, 0, 0]. The batch [1, 0, 1, 1]: mean 0.75, squared deviations
    # 0.0625·3 + 0.5625 = 0.75, unbiased variance 0.75 / 3 = 0.25, std 0.5 -> advantages [1, −1, 0, 0].
    # (With the group's own std, sqrt(0.5) = 0.7071, the first group would get ±0.7071.)
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    a = advantages.grpo(scores, group_size=2, eps=0.0, std_scope="batch")
    assert a.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-7)
    assert advantages.grpo(scores, 2).tolist() == pytest.approx([0.70711, -0.70711, 0, 0], abs=1e-5)
    # TRL adds 1e-4 to the std: 0.5 / (0.5 + 1e-4) = 0.99980.
    assert advantages.grpo(scores, 2, eps=1e-4, std_scope="batch")[0].item() == pytest.approx(0.5 / 0.5001, rel=1e-6)
    # Without std scaling (Dr.GRPO) the scope does not matter.
    assert advantages.grpo(scores, 2, scale_by_std=False, std_scope="batch").tolist() == [0.5, -0.5, 0.0, 0.0]


def test_grpo_batch_std_over_two_ranks_equals_one_rank_on_the_whole_batch():
    # Rank 0 holds group [1, 0], rank 1 group [1, 1]; summing n, Σr, Σr² over both ranks must give each
    # rank the std of all four scores (0.5 above), not its own (0.7071 on rank 0, 0 on rank 1).
    rank0, rank1 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])

    def both_ranks(sums):  # what an all-reduce of these sums over the two ranks returns
        other = rank1 if sums[0] == 2 and sums[1] == 1.0 else rank0
        return [a + b for a, b in zip(sums, [2.0, float(other.sum()), float((other**2).sum())])]

    whole = advantages.grpo(torch.cat([rank0, rank1]), 2, eps=0.0, std_scope="batch")
    split = torch.cat(
        [advantages.grpo(r, 2, eps=0.0, std_scope="batch", sum_over_ranks=both_ranks) for r in (rank0, rank1)]
    )
    assert split.tolist() == pytest.approx(whole.tolist(), abs=1e-7)
    algo = Algorithm(std_scope="batch", group_size=2)
    assert algo.advantages(AdvantageInputs(rank0, torch.ones(2, 1), 2, sum_over_ranks=both_ranks))[0].tolist() == (
        pytest.approx([1.0, -1.0], abs=1e-5)
    )
    with pytest.raises(ValueError, match=r"std_scope: unknown value 'global'; known: \['group', 'batch'\]"):
        Algorithm(std_scope="global")


def test_grpo_std_eps_matters_when_a_group_barely_varies():
    # Group [0, 0.001]: centred ±0.0005, std 0.0005·sqrt(2) = 7.0711e-4. eps 1e-6 -> ±0.70611;
    # TRL's 1e-4 -> 0.0005 / 8.0711e-4 = ±0.61950: 12 % smaller, from one constant.
    scores = torch.tensor([0.0, 0.001])
    assert advantages.grpo(scores, 2, eps=1e-6)[1].item() == pytest.approx(0.0005 / (7.0711e-4 + 1e-6), rel=1e-4)
    assert advantages.grpo(scores, 2, eps=1e-4)[1].item() == pytest.approx(0.0005 / (7.0711e-4 + 1e-4), rel=1e-4)


def test_dr_grpo_only_centres_the_rewards():
    a = advantages.grpo(torch.tensor([3.0, 1.0]), group_size=2, scale_by_std=False)
    assert a.tolist() == [1.0, -1.0]


def test_rloo_subtracts_the_mean_of_the_other_members():
    # Group [1, 0, 0]: 1 − (0+0)/2 = 1; 0 − (1+0)/2 = −0.5 twice.
    assert advantages.rloo(torch.tensor([1.0, 0.0, 0.0]), group_size=3).tolist() == pytest.approx([1.0, -0.5, -0.5])


def test_group_baselines_refuse_a_group_of_one():
    with pytest.raises(ValueError, match="group size must be ≥ 2"):
        advantages.grpo(torch.tensor([1.0, 0.0]), group_size=1)
    with pytest.raises(ValueError, match="group_size ≥ 2"):
        Algorithm(advantage="rloo", group_size=1)


def test_reinforce_pp_whitens_the_returns_over_all_valid_tokens():
    # Scores 1 and 0 on the last valid tokens; returns-to-go (γ = 1) are 1, 1 and 0 (row 1 has one token).
    token_rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    a = advantages.reinforce_pp(token_rewards, mask)
    # Valid values 1, 1, 0: mean 2/3, unbiased var 1/3.
    std = math.sqrt(1 / 3)
    assert a.flatten().tolist() == pytest.approx([(1 / 3) / std, (1 / 3) / std, (-2 / 3) / std, 0.0], rel=1e-5)


def test_gae_on_a_hand_worked_sequence():
    # rewards 0, 1 ; values 0.5, 0.25 ; γ = 0.9, λ = 0.8.
    # δ1 = 1 + 0.9·0 − 0.25 = 0.75 ; δ0 = 0 + 0.9·0.25 − 0.5 = −0.275
    # A1 = 0.75 ; A0 = −0.275 + 0.9·0.8·0.75 = 0.265 ; returns = A + V = 0.765, 1.0
    adv, ret = advantages.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 0.9, 0.8)
    assert adv.tolist()[0] == pytest.approx([0.265, 0.75])
    assert ret.tolist()[0] == pytest.approx([0.765, 1.0])


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    torch.manual_seed(0)
    r, v = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, 5)
    adv, _ = advantages.gae(r, v, mask, gamma=0.95, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1)], dim=1)
    assert torch.allclose(adv, r + 0.95 * next_v - v, atol=1e-6)


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    torch.manual_seed(0)
    r, v = torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = advantages.gae(r, v, mask, gamma=0.9, lam=1.0)
    for row in range(2):
        n = int(mask[row].sum())
        for t in range(n):
            discounted = sum(0.9 ** (k - t) * r[row, k] for k in range(t, n))
            assert adv[row, t].item() == pytest.approx((discounted - v[row, t]).item(), abs=1e-5)
            assert ret[row, t].item() == pytest.approx(discounted.item(), abs=1e-5)
    assert adv[1, 2:].abs().sum() == 0 and ret[1, 2:].abs().sum() == 0  # padding contributes nothing


# --- KL ---------------------------------------------------------------------------------------------


def test_kl_estimators_on_hand_worked_values():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -2.0]])
    # x = logp − ref = 1, 0 ; k1 = x ; k2 = x²/2 ; k3 = e^{−x} − 1 + x.
    assert kl.estimate(logp, ref, "k1").tolist()[0] == pytest.approx([1.0, 0.0])
    assert kl.estimate(logp, ref, "k2").tolist()[0] == pytest.approx([0.5, 0.0])
    assert kl.estimate(logp, ref, "k3").tolist()[0] == pytest.approx([math.exp(-1) - 1 + 1, 0.0])
    with pytest.raises(KeyError, match="k3"):
        kl.estimate(logp, ref, "k4")


def test_k3_is_never_negative_and_stays_finite():
    x = torch.linspace(-60, 60, 1001)[None]
    k3 = kl.estimate(x, torch.zeros_like(x), "k3")
    assert (k3 >= 0).all() and torch.isfinite(k3).all()


# --- policy losses ----------------------------------------------------------------------------------


def test_ppo_clip_on_hand_worked_tokens():
    # ratios e^{0.5}=1.6487 (A=+1, clipped to 1.2), e^{-0.5}=0.6065 (A=−1, clipped to 0.8), 1 (A=2).
    logp = torch.tensor([[0.5, -0.5, 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, stats = losses.ppo_clip(logp, old, adv, torch.ones(1, 3), 0.2, 0.2, "token-mean")
    # per-token −min(ρA, clip(ρ)A): −1.2, −(−0.8)=0.8, −2 -> mean (−1.2 + 0.8 − 2)/3 = −0.8
    assert loss.item() == pytest.approx(-0.8, rel=1e-5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)


def test_ppo_clip_has_zero_gradient_outside_the_range_on_the_side_the_advantage_pushes():
    # ρ = 1.5 > 1 + ε with A > 0, and ρ = 0.5 < 1 − ε with A < 0: both clipped, no gradient.
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    loss, _ = losses.ppo_clip(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2, 0.2)
    loss.backward()
    assert logp.grad.abs().max().item() == 0.0
    # On the other side (ρ = 1.5 with A < 0) the unclipped term is the min and the gradient flows.
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = losses.ppo_clip(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2, 0.2)
    loss.backward()
    assert logp.grad.item() == pytest.approx(1.5)  # d/dlogp of −(ρ·A) = −A·ρ = 1.5


def test_ppo_clip_honours_asymmetric_bounds():
    # ρ = 1.25 with A > 0: inside [0.8, 1.28] (clip-higher) so the gradient flows; outside [0.8, 1.2].
    logp = torch.log(torch.tensor([[1.25]])).requires_grad_()
    loss, _ = losses.ppo_clip(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.28)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-1.25)


def test_sequence_advantages_broadcast_over_tokens():
    logp = torch.randn(2, 3)
    a, _ = losses.ppo_clip(logp, logp, torch.tensor([1.0, -2.0]), torch.ones(2, 3))
    b, _ = losses.ppo_clip(logp, logp, torch.tensor([[1.0] * 3, [-2.0] * 3]), torch.ones(2, 3))
    assert a.item() == pytest.approx(b.item())


def test_pg_gradient_equals_ppo_clip_gradient_on_fresh_samples():
    torch.manual_seed(0)
    base = torch.randn(3, 4)
    adv, mask = torch.randn(3), torch.ones(3, 4)
    grads = []
    for fn in (losses.pg, losses.ppo_clip):
        logp = base.clone().requires_grad_()
        loss, _ = fn(logp, base, adv, mask, agg="seq-mean-token-mean")
        loss.backward()
        grads.append(logp.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# --- the Algorithm object ---------------------------------------------------------------------------


def test_algorithm_adds_the_kl_term_with_its_coefficient():
    logp, ref = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -1.0]])
    mask = torch.ones(1, 2)
    algo = Algorithm(advantage="grpo", group_size=2, kl_coef=0.5, kl_estimator="k1", loss_agg="token-mean")
    zero_adv = torch.zeros(1)
    loss, stats = algo.loss(logp, logp.detach(), zero_adv, mask, ref_logp=ref)
    # policy term 0; k1 = [1, 0], token mean 0.5, times β = 0.5 -> 0.25.
    assert loss.item() == pytest.approx(0.25)
    assert stats["kl"].item() == pytest.approx(0.5)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(
        ValueError, match=r"^advantage: .* known: \['gae', 'grpo', 'reinforce', 'reinforce_pp', 'rloo'\]"
    ):
        Algorithm(advantage="ppo2")
    with pytest.raises(ValueError, match="^policy_loss: .*ppo_clip"):
        Algorithm(policy_loss="nope")
    assert "grpo" in ADVANTAGE_ESTIMATORS


def test_algorithm_needs_a_reference_only_with_a_kl_coefficient():
    assert not Algorithm(kl_coef=0.0).needs_reference
    assert Algorithm(kl_coef=0.04).needs_reference
    inputs = AdvantageInputs(torch.tensor([1.0, 0.0]), torch.ones(2, 3), group_size=2)
    assert Algorithm(group_size=2).advantages(inputs)[0].tolist() == pytest.approx([0.7071, -0.7071], rel=1e-3)
