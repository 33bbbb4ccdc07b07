"""The training step on the tiny model, in-process."""

import torch
from hydra import compose, initialize_config_dir

from rlctl.algos import AdvantageInputs
from rlctl.build import build_train
from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.scoring import response_logprobs
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
    batch = stages.rollout.generate(model, stages.train_prompts.token_ids[:2], ["", ""], group_size=4)
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
