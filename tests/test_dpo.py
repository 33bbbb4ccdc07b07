"""`rlctl dpo`: the losses and their gradients by hand, the reference taken once from the initial
policy, micro-batches against the whole batch, the config's mistakes, and the run end to end."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from stage_helpers import gradient_of_update
from test_cli import rlctl, rlctl_here

from rlctl.algos.preference import dpo_loss
from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.dpo import REFERENCE_FILE, build_dpo, reference_logprobs
from rlctl.offline import offline_step


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_and_gradient_by_hand():
    # One pair: log π(y_c) = −1, log π(y_r) = −2, the reference gives both −1.5, β = 0.1.
    # h = (−1 + 1.5) − (−2 + 1.5) = 1; loss = −log σ(β·h) = −log σ(0.1) = 0.644397.
    logp_c, logp_r = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    ref = torch.tensor([-1.5])
    loss, stats = dpo_loss(logp_c, logp_r, ref, ref, beta=0.1)
    assert float(loss.detach()) == pytest.approx(0.644397, abs=1e-6)
    loss.backward()
    # dL/dlog π(y_c) = −β·(1 − σ(β·h)) = −0.1 · (1 − 0.524979) = −0.0475021; the rejected side is its negative.
    assert float(logp_c.grad) == pytest.approx(-0.1 * (1 - sigmoid(0.1)), abs=1e-7)
    assert float(logp_c.grad) == pytest.approx(-0.0475021, abs=1e-6)
    assert float(logp_r.grad) == pytest.approx(0.0475021, abs=1e-6)
    # implicit rewards β·(log π − log π_ref): chosen 0.1·0.5 = 0.05, rejected 0.1·(−0.5) = −0.05
    assert float(stats["dpo/reward_chosen"]) == pytest.approx(0.05)
    assert float(stats["dpo/reward_rejected"]) == pytest.approx(-0.05)
    assert float(stats["dpo/reward_margin"]) == pytest.approx(0.1) and float(stats["dpo/accuracy"]) == 1.0


def test_label_smoothing_mixes_in_the_flipped_label():
    # ε = 0.2: 0.8·(−log σ(0.1)) + 0.2·(−log σ(−0.1)) = 0.8·0.644397 + 0.2·0.744397 = 0.664397
    logp_c, logp_r, ref = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5])
    loss, _ = dpo_loss(logp_c, logp_r, ref, ref, beta=0.1, label_smoothing=0.2)
    assert float(loss) == pytest.approx(0.664397, abs=1e-6)


def test_the_nll_term_adds_the_chosen_replies_length_normalised_nll():
    # The pair above with the chosen reply 2 tokens long, α = 1: NLL term −(−1)/2 = 0.5, so the loss
    # is 0.644397 + 0.5 = 1.144397, and dL/dlog π(y_c) = −0.0475021 − α/2 = −0.5475021 (the
    # rejected side keeps +0.0475021: the term does not touch it).
    logp_c, logp_r = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    ref = torch.tensor([-1.5])
    loss, stats = dpo_loss(logp_c, logp_r, ref, ref, beta=0.1, nll_coef=1.0, chosen_tokens=torch.tensor([2.0]))
    assert float(loss.detach()) == pytest.approx(1.144397, abs=1e-6)
    loss.backward()
    assert float(logp_c.grad) == pytest.approx(-0.5475021, abs=1e-6)
    assert float(logp_r.grad) == pytest.approx(0.0475021, abs=1e-6)
    assert float(stats["dpo/nll_chosen"]) == pytest.approx(0.5)
    # Summed over pairs like the preference loss: a second pair (−3 over 3 tokens) adds 1.0 · α.
    two, _ = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -4.0]), torch.tensor([-1.5, -3.5]),
                      torch.tensor([-1.5, -3.5]), beta=0.1, nll_coef=1.0, chosen_tokens=torch.tensor([2.0, 3.0]))  # fmt: skip
    assert float(two) == pytest.approx(2 * 0.644397 + 0.5 + 1.0, abs=1e-6)


def test_ipo_regresses_the_gap_to_one_over_two_beta():
    # β = 0.5: target 1/(2β) = 1. h = 1 costs nothing; h = 3 costs (3 − 1)² = 4, gradient 2·(h − 1) = 4.
    ref = torch.tensor([0.0])
    at_target, _ = dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), ref, ref, beta=0.5, loss_type="ipo")
    assert float(at_target) == pytest.approx(0.0)
    logp_c = torch.tensor([3.0], requires_grad=True)
    past, _ = dpo_loss(logp_c, torch.tensor([0.0]), ref, ref, beta=0.5, loss_type="ipo")
    past.backward()
    assert float(past.detach()) == pytest.approx(4.0) and float(logp_c.grad) == pytest.approx(4.0)


def test_ipo_length_normalised_divides_each_log_ratio_by_its_reply_length():
    # Chosen: log-ratio −1 − (−3) = 2 over 4 tokens; rejected: −6 − (−5) = −1 over 2 tokens.
    # Summed (the paper's form): h = 2 − (−1) = 3; β = 0.5 -> (3 − 1)² = 4.
    # Per token (TRL's IPO): h = 2/4 − (−1/2) = 1 -> (1 − 1)² = 0.
    args = (torch.tensor([-1.0]), torch.tensor([-6.0]), torch.tensor([-3.0]), torch.tensor([-5.0]))
    counts = {"chosen_tokens": torch.tensor([4.0]), "rejected_tokens": torch.tensor([2.0])}
    summed, stats = dpo_loss(*args, beta=0.5, loss_type="ipo", **counts)
    per_token, same_stats = dpo_loss(*args, beta=0.5, loss_type="ipo", length_normalised=True, **counts)
    assert float(summed) == pytest.approx(4.0) and float(per_token) == pytest.approx(0.0)
    # The implicit rewards are β·(summed log-ratio) either way: 0.5·2 = 1 and 0.5·(−1) = −0.5.
    assert float(stats["dpo/reward_margin"]) == float(same_stats["dpo/reward_margin"]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(*args, beta=0.5, loss_type="ipo", length_normalised=True)


def test_at_the_reference_every_pair_costs_log_two():
    # Before any update π = π_ref, so h = 0 and each pair's loss is −log σ(0) = log 2, whatever β.
    logp = torch.tensor([-3.0, -7.0, -0.5])
    loss, stats = dpo_loss(logp, logp.flip(0), logp, logp.flip(0), beta=0.3)
    assert float(loss) == pytest.approx(3 * math.log(2)) and float(stats["dpo/reward_margin"]) == 0.0


def compose_dpo(*overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("dpo", overrides=["model.path=random:tiny", "logger.console=false", "engine.precision=no",
                                         "eval.enabled=false", "data.pairs_per_problem=1", *overrides])  # fmt: skip


def test_the_reference_is_the_initial_policy_scored_once(tmp_path):
    run = build_dpo(compose_dpo("pairs_per_step=4", "nll_coef=0"), tmp_path, "")  # plain DPO: log 2 at the reference
    saved = torch.load(tmp_path / REFERENCE_FILE, weights_only=True)
    objective = run.objective
    chosen, rejected = reference_logprobs(run.engine.model, objective.train, run.tokenizer.pad_token_id, 7,
                                          run.engine.autocast)  # fmt: skip
    torch.testing.assert_close(saved["train_chosen"], chosen)
    torch.testing.assert_close(saved["train_rejected"], rejected)
    assert len(chosen) == len(objective.train) and bool((chosen < 0).all())
    metrics = offline_step(run)  # the first step starts at the reference: loss log 2
    assert metrics["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    run.logger.close()


def one_step_gradient(tmp_path, *overrides):
    """The gradient of the first update off the reference (π ≠ π_ref, so it depends on h), and its metrics."""
    return gradient_of_update(build_dpo(compose_dpo(*overrides), tmp_path, ""), updates_before=1)


def test_micro_batches_give_the_update_of_the_whole_batch(tmp_path):
    whole, whole_metrics = one_step_gradient(tmp_path / "a", "pairs_per_step=6", "optim.micro_batch_size=6",
                                             "optim.lr=1e-2")  # fmt: skip
    split, metrics = one_step_gradient(tmp_path / "b", "pairs_per_step=6", "optim.micro_batch_size=4", "optim.lr=1e-2")
    assert metrics["loss/dpo"] == pytest.approx(whole_metrics["loss/dpo"], rel=1e-5)
    assert whole_metrics["loss/dpo"] != pytest.approx(math.log(2), abs=1e-6)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    result = rlctl("dpo", "model=tiny", "steps=3", "pairs_per_step=4", "optim.micro_batch_size=2",
                   "data.pairs_per_problem=1", "data.eval_size=8", "checkpoint.every=2", f"hydra.run.dir={run_dir}")  # fmt: skip
    return run_dir, result


def test_dpo_writes_eval_json_with_preference_and_task_accuracy(dpo_run):
    from transformers import AutoModelForCausalLM

    run_dir, result = dpo_run
    evaluation = json.loads((run_dir / "eval.json").read_text())
    for when in ("before", "after"):
        assert evaluation[when]["n_pairs"] == 8 and 0 <= evaluation[when]["accuracy"] <= 1
        assert evaluation[when]["n_prompts"] == 8
    assert evaluation["before"]["reward_margin"] == 0.0  # the policy is its own reference before training
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/dpo" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert {"dpo/reward_chosen", "dpo/reward_rejected", "dpo/reward_margin", "dpo/accuracy"} <= set(steps[0])
    for name in ("curves.png", "checkpoints/final/README.md", REFERENCE_FILE):
        assert (run_dir / name).exists(), name
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final")
    assert "preference accuracy" in result.stdout


def test_dpo_resumes_with_the_saved_reference(dpo_run):
    run_dir, _ = dpo_run
    before = (run_dir / REFERENCE_FILE).read_bytes()
    result = rlctl("dpo", "model=tiny", "steps=4", "pairs_per_step=4", "optim.micro_batch_size=2",
                   "data.pairs_per_problem=1", "data.eval_size=8", "checkpoint.every=2", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert "resumed from" in result.stdout and "reference log-probs" not in result.stdout
    assert (run_dir / REFERENCE_FILE).read_bytes() == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss_type=kto"], "loss_type: must be one of ['ipo', 'sigmoid']"),
        (["beta=0"], "beta: must be > 0"),
        (["loss_type=ipo", "label_smoothing=0.1"], "label_smoothing: applies to loss_type=sigmoid only"),
        (["ipo_length_normalised=true"], "ipo_length_normalised: applies to loss_type=ipo only"),
        (["optim.minibatch_size=4"], "optim.minibatch_size: rlctl dpo makes one update"),
        (["data.source=jsonl"], "data.path: the jsonl source needs a file of preference pairs"),
    ],
)
def test_dpo_mistakes_get_one_line(overrides, message, tmp_path):
    result = rlctl_here("dpo", "model=tiny", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
