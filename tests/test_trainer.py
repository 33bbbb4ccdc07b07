"""The training step on the tiny model, in-process."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from rlctl.algos import AdvantageInputs
from rlctl.build import build_train
from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.optim.scoring import response_logprobs
from rlctl.trainer import TrainState, _optimise, train_step


def build(tmp_path, *overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=["recipe=smoke", "logger.console=false", *overrides])
    return build_train(cfg, tmp_path)


def test_a_reference_model_is_loaded_only_when_the_kl_coefficient_is_nonzero(tmp_path):
    assert build(tmp_path, "algo.kl_coef=0.04").reference is not None
    assert build(tmp_path, "algo.kl_coef=0").reference is None
    assert build(tmp_path, "algo=rloo").reference is None


def test_an_update_raises_the_likelihood_of_rewarded_completions_and_lowers_the_others(tmp_path):
    stages = build(tmp_path, "optim.lr=1e-3", "algo.kl_coef=0", "engine.precision=no")
    torch.manual_seed(0)
    model = stages.policy.unwrapped()
    batch = stages.rollout.generate(stages.policy, stages.train_prompts.token_ids[:2], ["", ""], group_size=4)
    # Reward the first two completions of each group: advantages +, +, −, − per group.
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0] * 2)
    batch = batch.with_(
        scores=scores, advantages=stages.algo.advantages(AdvantageInputs(scores, batch.response_mask, 4))[0]
    )

    def sequence_logp():
        with torch.no_grad():
            logp, _ = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length)
        return (logp * batch.response_mask).sum(1)

    before = sequence_logp()
    stats = _optimise(stages, batch, kl_coef=0.0, train_policy=True)
    change = sequence_logp() - before
    assert (change[scores == 1] > 0).all() and (change[scores == 0] < 0).all(), change
    assert stats["optim/updates"] == 1 and stats["grad_norm"] > 0


def test_minibatches_and_iterations_give_the_expected_number_of_updates(tmp_path):
    stages = build(tmp_path, "optim.minibatch_size=4", "algo.num_iterations=2", "algo.kl_coef=0")
    metrics = train_step(stages, TrainState(step=1))
    # 2 prompts × 4 completions = 8 samples -> 2 minibatches of 4, twice.
    assert metrics["optim/updates"] == 4
    assert 0.0 <= metrics["clip_frac"] <= 1.0


def test_grpo_builds_no_critic_and_ppo_builds_one_from_the_same_defaults(tmp_path):
    grpo = build(tmp_path, "algo=grpo", "algo.kl_coef=0")
    assert grpo.critic is None and grpo.reference is None
    ppo = build(tmp_path, "algo=ppo")
    assert ppo.critic is not None and ppo.reference is not None
    assert ppo.algo.needs_values and not grpo.algo.needs_values


def test_the_critic_starts_from_the_policy_weights_with_a_zero_head(tmp_path):
    stages = build(tmp_path, "algo=ppo")
    policy_embed = stages.policy.unwrapped().get_input_embeddings().weight
    critic = stages.critic.unwrapped()
    assert torch.equal(critic.backbone.get_input_embeddings().weight, policy_embed)
    assert critic.backbone.get_input_embeddings().weight.data_ptr() != policy_embed.data_ptr()  # a copy, not shared
    assert critic.head.weight.abs().sum() == 0


@pytest.mark.parametrize("algo", sorted(p.stem for p in (CONF_DIR / "algo").glob("*.yaml")))
def test_every_algorithm_trains_two_steps_on_the_tiny_model(tmp_path, algo):
    stages = build(tmp_path, f"algo={algo}", "reward.terms=[{name: format, pattern: ing}]")
    state = TrainState(step=0, kl_coef=stages.algo.kl_coef)
    for _ in range(2):
        state.step += 1
        metrics = train_step(stages, state)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["optim/updates"] >= 1
    if stages.critic is not None:
        assert {"loss/value", "value/explained_variance", "value/mean", "returns/mean"} <= set(metrics)


def test_critic_warmup_trains_only_the_critic(tmp_path):
    stages = build(tmp_path, "algo=ppo", "critic.warmup_steps=1", "reward.terms=[{name: format, pattern: ing}]")
    before = [p.detach().clone() for p in stages.policy.model.parameters()]
    metrics = train_step(stages, TrainState(step=1, kl_coef=stages.algo.kl_coef))
    assert metrics["optim/updates"] == 0 and "critic/grad_norm" in metrics
    assert all(torch.equal(a, b) for a, b in zip(before, stages.policy.model.parameters()))


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_signal(tmp_path):
    stages = build(tmp_path, "algo=dapo", "algo.overlong_buffer=0", "reward.terms=[{name: format, pattern: ing}]")
    metrics = train_step(stages, TrainState(step=1))
    assert metrics["sampling/prompts_sampled"] >= 2
    assert metrics["advantages/std"] > 0  # every kept group has rewards that differ


def test_the_adaptive_kl_coefficient_moves_between_steps_and_is_logged(tmp_path):
    stages = build(tmp_path, "algo=grpo", "algo.kl_coef=0.1", "algo.kl_target=1e-9", "algo.kl_horizon=8",
                   "optim.lr=1e-3", "reward.terms=[{name: format, pattern: ing}]")  # fmt: skip
    state = TrainState(kl_coef=0.1)
    logged = []
    for _ in range(3):
        state.step += 1
        logged.append(train_step(stages, state)["kl_coef"])
    # Step 1 measures KL before any update: exactly 0, below the target, so β falls by the clipped
    # 20% × n/horizon (8 samples / 8) = 20%: 0.1 -> 0.08. From step 2 the policy has moved, the KL is
    # far above the tiny target and β rises 20%: 0.08 -> 0.096.
    assert logged == pytest.approx([0.1, 0.08, 0.096])
