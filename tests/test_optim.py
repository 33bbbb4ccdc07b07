"""The optimisation stage under every batch layout a user can configure, on the tiny model in-process:
each layout must train exactly like the simple one (one minibatch, one micro-batch). The 2-rank
layouts run under DeepSpeed in test_deepspeed.py."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from rlctl.algos import POLICY_LOSSES, ops
from rlctl.batch import Batch
from rlctl.build import build_train
from rlctl.checkpoint import TrainState
from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.optim.update import micro_batches, padding_fraction, row_groups
from rlctl.trainer import _optimise, train_step


def build(tmp_path, *overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=["recipe=smoke", "logger.console=false", "engine.precision=no", *overrides])
    return build_train(cfg, tmp_path)


def test_every_update_after_the_first_is_clipped_against_the_stored_log_probs(tmp_path, monkeypatch):
    # 2 prompts × 4 completions = 8 samples, minibatch 4, one iteration: 2 updates per step. The
    # second minibatch was sampled by the policy before the first update; at lr 0.05 that update
    # moves the tiny model far, so the ratio π/π_old of the second minibatch must be far from 1.
    reward = tmp_path / "reward.py"
    reward.write_text("def score(completion, answer):\n    return float(len(completion) % 2)\n")
    stages = build(tmp_path / "run", "optim.minibatch_size=4", "optim.micro_batch_size=4", "optim.lr=5e-2",
                   "algo.kl_coef=0", f"reward.fn={reward}:score")  # fmt: skip
    assert stages.layout.updates_per_step == 2
    ratios = []
    real = POLICY_LOSSES.get("ppo_clip")

    def spy(logp, old_logp, advantages, mask, **kwargs):
        ratios.append(torch.exp(logp - old_logp).detach()[mask.bool()])
        return real(logp, old_logp, advantages, mask, **kwargs)

    monkeypatch.setitem(POLICY_LOSSES._table, "ppo_clip", spy)
    torch.manual_seed(0)
    metrics = train_step(stages, TrainState(step=1))
    assert metrics["advantages/std"] > 0 and metrics["optim/updates"] == 2
    first, second = ratios  # one micro-batch per minibatch
    print(f"max |ratio − 1|: minibatch 1 {(first - 1).abs().max():.2e}, minibatch 2 {(second - 1).abs().max():.3f}; "
          f"clip_frac {metrics['clip_frac']:.3f}, approx_kl {metrics['approx_kl']:.4f}")  # fmt: skip
    assert (first - 1).abs().max() < 1e-4  # nothing has moved yet: π = π_old
    assert (second - 1).abs().max() > 0.1, second  # stale samples: the true ratio, not a forced 1
    assert metrics["clip_frac"] > 0 and metrics["approx_kl"] > 0, metrics


def hand_made_batch(advantages_seed: int = 1) -> Batch:
    """8 rows, 2 groups of 4 with one prompt each (5 tokens), responses of unequal length (1 to 6 of T = 6 tokens)."""
    generator = torch.Generator().manual_seed(advantages_seed)
    lengths = [6, 1, 3, 6, 2, 5, 4, 6]
    mask = torch.zeros(8, 6)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    ids = torch.randint(10, 2000, (8, 11), generator=generator)
    ids[:, :5] = ids[[0, 0, 0, 0, 4, 4, 4, 4], :5]  # a group's completions answer one prompt
    return Batch(
        input_ids=ids, attention_mask=torch.cat([torch.ones(8, 5, dtype=torch.long), mask.long()], dim=1),
        response_mask=mask, group_ids=torch.arange(8) // 4, prompts=[""] * 8, completions=[""] * 8, answers=[""] * 8,
        advantages=torch.randn(8, generator=generator), ref_logprobs=-11.0 + torch.rand(8, 6, generator=generator),  # near the tiny model's log(1/49152)
    )  # fmt: skip


# Layouts of one minibatch of hand_made_batch()'s 8 rows (prompts 5 tokens, responses 6, 1, 3, 6, 2,
# 5, 4, 6): fixed runs of rows, and a budget of 24 padded tokens, which sorts the rows by length and
# takes rows × (5 + longest response) ≤ 24: rows {1, 4, 2} (3 × 8), {6, 5} (2 × 10), {0, 3} (2 × 11), {7}.
# The simple layout runs every row alone; the others run each prompt once per micro-batch
# (optim.share_prompts, the default) wherever two of its rows share one.
LAYOUTS = {
    "one micro-batch": ["optim.micro_batch_size=8", "optim.share_prompts=false"],
    "one micro-batch, prompts shared": ["optim.micro_batch_size=8"],
    "3 + 3 + 2 rows": ["optim.micro_batch_size=3"],
    "one row each": ["optim.micro_batch_size=1"],
    "≤ 24 tokens, by length": ["optim.micro_batch_size=8", "optim.max_tokens_per_micro_batch=24"],
}


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
def test_micro_batch_splits_give_the_same_update_as_one_micro_batch_for_every_aggregation(tmp_path, agg):
    # Adam's first step is lr·g / (|g| + ε) per weight; with lr = 1e6 and ε = 1e4 that is about 100·g
    # (|g| here is far below ε), so equal updates mean equal gradients, scale included, and the update
    # dwarfs the weights' own rounding. Clipping is off. KL and entropy terms use the same aggregation.
    common = ["optim.lr=1e6", "optim.eps=1e4", "optim.max_grad_norm=0", f"algo.loss_agg={agg}", "algo.kl_coef=0.1",
              "algo.entropy_coef=0.01"]  # fmt: skip
    results = {}
    for index, (name, layout) in enumerate(LAYOUTS.items()):
        stages = build(tmp_path / str(index), *layout, *common)
        torch.manual_seed(0)
        metrics = _optimise(stages, hand_made_batch(), kl_coef=0.1, train_policy=True)
        weights = {k: v.detach().clone() for k, v in stages.policy.unwrapped().state_dict().items()}
        results[name] = (metrics, weights)
    (simple, simple_weights) = results["one micro-batch"]
    for name in list(LAYOUTS)[1:]:
        metrics, weights = results[name]
        assert metrics["grad_norm"] == pytest.approx(simple["grad_norm"], rel=1e-5), name
        assert metrics["loss/total"] == pytest.approx(simple["loss/total"], rel=1e-5), name
        worst = worst_relative_difference(weights, simple_weights, stages.policy.unwrapped())
        print(f"{agg}: {name} vs one micro-batch: grad norm {metrics['grad_norm']:.6f} vs {simple['grad_norm']:.6f}, "
              f"largest relative weight difference {worst:.1e}")  # fmt: skip
        assert worst < 1e-4, name


def test_a_token_budget_groups_rows_of_like_length_and_pads_less():
    lengths = [(5, n) for n in (6, 1, 3, 6, 2, 5, 4, 6)]
    assert row_groups(lengths, 8, max_tokens=24) == [[1, 4, 2], [6, 5], [0, 3], [7]]
    assert row_groups(lengths, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert row_groups([(5, 40), (5, 1)], 8, max_tokens=24) == [[1], [0]]  # a row over the budget goes alone
    # Real tokens 8 × 5 + 33 = 73. Fixed micro-batches at the full width: 8 × 11 = 88 -> 15/88 padding.
    # The budget's micro-batches, trimmed: 3 × 8 + 2 × 10 + 2 × 11 + 1 × 11 = 77 -> 4/77 padding.
    fixed, budget = padding_fraction(hand_made_batch(), 8, max_tokens=24)
    assert fixed == pytest.approx(15 / 88) and budget == pytest.approx(4 / 77)
    trimmed = [m.input_ids.shape for m in micro_batches(hand_made_batch(), 8, max_tokens=24)]
    assert trimmed == [(3, 8), (2, 10), (2, 11), (1, 11)]


def worst_relative_difference(weights: dict, reference: dict, model) -> float:
    """max over tensors of max|w − w_ref| / max|w_ref − w_init|: fp32 summation order gives ~1e-7 to
    ~1e-5 (micro-batches trimmed to their own width sum attention over fewer columns); a
    wrongly weighted micro-batch or rank gives ~1e-1."""
    from rlctl.models import load_causal_lm, load_tokenizer

    initial = load_causal_lm("random:tiny", load_tokenizer("random:tiny"), seed=0).state_dict()
    return max(
        (weights[k] - reference[k]).abs().max().item() / max((reference[k] - initial[k]).abs().max().item(), 1e-12)
        for k in weights
    )


def test_several_minibatches_and_iterations_make_one_update_each(tmp_path):
    stages = build(tmp_path, "optim.minibatch_size=2", "algo.num_iterations=3", "algo.kl_coef=0")
    # 8 samples in minibatches of 2: 4 updates per pass, 3 passes.
    assert stages.layout.updates_per_step == 12 and stages.layout.minibatches_per_step == 4
    metrics = train_step(stages, TrainState(step=1))
    assert metrics["optim/updates"] == 12
