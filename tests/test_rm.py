"""`rlctl rm`: the Bradley-Terry loss by hand, layouts that must give the same update, the data's
mistakes named, and the run end to end on the tiny model (its final folder used as a reward)."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from stage_helpers import gradient_of_update
from test_cli import rlctl, rlctl_here

from rlctl.algos.preference import bradley_terry_loss
from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.data.preferences import PreferenceSpec, encode_pairs, load_pairs, pair_from_row
from rlctl.errors import RlctlError
from rlctl.rm import build_rm


def test_bradley_terry_loss_and_gradient_by_hand():
    chosen = torch.tensor([2.0, 0.0, 1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0])
    margins = torch.tensor([0.0, 0.0, -1.0])
    loss = bradley_terry_loss(chosen, rejected, margins)
    # −log σ(2) − log σ(0) − log σ(0 + 1) = 0.126928 + 0.693147 + 0.313262
    assert float(loss.detach()) == pytest.approx(0.126928 + 0.693147 + 0.313262, abs=1e-6)
    loss.backward()
    # d/dr_c of −log σ(d) is −σ(−d): −(1 − σ(2)), −0.5, −(1 − σ(1))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert chosen.grad.tolist() == pytest.approx([-(1 - sigmoid(2)), -0.5, -(1 - sigmoid(1))], abs=1e-6)


def test_a_margin_asks_for_a_wider_gap():
    # With r_c − r_r = 1, a margin of 1 makes the pair count as a tie: −log σ(0) = log 2.
    assert float(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]))) == pytest.approx(
        math.log(2)
    )


def compose_rm(*overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("rm", overrides=["model.path=random:tiny", "logger.console=false", *overrides])


def one_step_gradient(tmp_path, *overrides):
    """The gradient the first step's update applies, and the step's metrics."""
    return gradient_of_update(
        build_rm(compose_rm("engine.precision=no", "eval.enabled=false", *overrides), tmp_path, "")
    )


def test_micro_batches_give_the_update_of_the_whole_batch(tmp_path):
    # 8 pairs as one micro-batch, as 4 × 2 pairs, and as 3 + 3 + 2 (uneven): the loss of each
    # micro-batch is its share of the 8 pairs' mean, so the accumulated gradient is the same.
    whole, whole_metrics = one_step_gradient(tmp_path / "a", "pairs_per_step=8", "optim.micro_batch_size=8")
    assert any(float(g.abs().max()) > 1e-4 for g in whole.values())
    for micro in (2, 3):
        split, metrics = one_step_gradient(
            tmp_path / f"m{micro}", "pairs_per_step=8", f"optim.micro_batch_size={micro}"
        )
        assert metrics["loss/rm"] == pytest.approx(whole_metrics["loss/rm"], abs=1e-6)
        assert metrics["rm/accuracy"] == pytest.approx(whole_metrics["rm/accuracy"])
        for name, value in whole.items():
            torch.testing.assert_close(split[name], value, atol=1e-6, rtol=1e-4)


def test_builtin_pairs_split_by_problem_and_differ(tokenizer):
    spec = PreferenceSpec("arithmetic", None, None, "train", "test", "prompt", "chosen", "rejected", 0.2, 256, 0, 1, 2,
                          "+", 4, 0.5, None, 512)  # fmt: skip
    train, held_out = load_pairs(spec)
    assert len(train) == 4 * 84 and len(held_out) == 4 * 16  # 100 problems, 16 held out by hash
    assert not {p.origin for p in train} & {p.origin for p in held_out}
    pair = train[0]
    expression = pair.origin.split(":")[1]
    assert pair.prompt[-1]["content"].startswith(f"What is {expression}?")
    assert str(eval(expression)) in pair.chosen[0]["content"]  # noqa: S307
    assert pair.chosen != pair.rejected
    encoded = encode_pairs(train[:4], tokenizer, 512)
    assert len(encoded) == 4 and encoded.skipped == 0
    assert encode_pairs(train[:4], tokenizer, 8).skipped == 4


def test_builtin_rejected_replies_are_worse_as_their_kind_says():
    # Each kind's rejected reply differs from its chosen one as its name says: the exact-number rule
    # (the gold reward) scores every chosen reply 1 and a wrong number 0; a reply with no answer names
    # no number beyond the question's own; rambling and restating keep the right number (worse in
    # form, not in sum).
    from rlctl.rewards.rules import exact_number

    spec = PreferenceSpec("arithmetic", None, None, "train", "test", "prompt", "chosen", "rejected", 0.2, 256, 0, 1, 2,
                          "+", 8, 0.5, None, 512)  # fmt: skip
    train, _ = load_pairs(spec)
    assert {p.kind for p in train} == {"wrong_number", "rambling", "restating", "no_answer"}
    for pair in train:
        expression = pair.origin.split(":")[1]
        answer = str(eval(expression))  # noqa: S307
        chosen, rejected = pair.chosen[0]["content"], pair.rejected[0]["content"]
        assert exact_number(chosen, answer) == 1.0, chosen
        if pair.kind == "wrong_number":
            assert exact_number(rejected, answer) == 0.0, rejected
        if pair.kind == "no_answer":
            assert not any(ch.isdigit() for ch in rejected.replace(expression, ""))
        elif pair.kind in ("rambling", "restating"):
            assert answer in rejected, rejected


def test_rows_as_strings_messages_or_whole_conversations():
    prompt = [{"role": "user", "content": "2+2?"}]
    a = pair_from_row({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "f:1")
    b = pair_from_row({"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}]}, "f:2")  # fmt: skip
    c = pair_from_row({"prompt": prompt, "chosen": [*prompt, {"role": "assistant", "content": "4"}],
                       "rejected": [*prompt, {"role": "assistant", "content": "5"}], "margin": 2}, "f:3")  # fmt: skip
    assert a.prompt == b.prompt == c.prompt == prompt
    assert a.chosen == b.chosen == c.chosen == [{"role": "assistant", "content": "4"}]
    assert (a.margin, c.margin) == (0.0, 2.0)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "a"}, "data: row pairs.jsonl:7 has no field 'rejected'"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "data: row pairs.jsonl:7: chosen and rejected are the same"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "data: row pairs.jsonl:7: field 'chosen' is empty"),
        (
            {"prompt": "q", "chosen": [{"text": "a"}], "rejected": "b"},
            "field 'chosen' must be a non-empty string or chat",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' must be a number"),
    ],
)
def test_a_bad_row_is_named_with_its_file_and_line(row, message):
    with pytest.raises(RlctlError, match=message):
        pair_from_row(row, "pairs.jsonl:7")


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rm") / "run"
    result = rlctl("rm", "model.path=random:tiny", "steps=3", "pairs_per_step=8", "optim.micro_batch_size=4",
                   "data.pairs_per_problem=1", "checkpoint.every=2", f"hydra.run.dir={run_dir}")  # fmt: skip
    return run_dir, result


def test_rm_writes_eval_json_curves_and_a_final_reward_model(rm_run):
    from transformers import AutoModelForSequenceClassification

    run_dir, result = rm_run
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert set(evaluation) == {"before", "after"}
    assert 0 <= evaluation["after"]["pairwise_accuracy"] <= 1 and evaluation["after"]["n_pairs"] == 16
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/rm" in r] == [1, 2, 3]
    assert {"rm/accuracy", "rm/margin", "grad_norm", "lr"} <= set(rows[1])
    for name in ("curves.png", "config.yaml", "checkpoints/final/README.md", "checkpoints/step-000003"):
        assert (run_dir / name).exists(), name
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "checkpoints" / "final")
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert "pairwise accuracy" in result.stdout and "reward.model_path=" in result.stdout


def test_the_trained_reward_model_serves_as_the_reward_of_a_training_run(rm_run, tmp_path):
    run_dir, _ = rm_run
    out = tmp_path / "ppo"
    rlctl("train", "recipe=smoke", "algo=ppo", "reward=model", f"reward.model_path={run_dir}", "reward.normalize=true",
          f"hydra.run.dir={out}")  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2 and all("reward/reward_model" in r and "accuracy" in r for r in steps)
    assert all(r["reward/exact_number"] == r["accuracy"] for r in steps)  # the weight-0 rule reports accuracy
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["rewards"]["reward_model"]["moments"]["count"] == 2 * 2 * 4  # 2 steps × 2 prompts × 4 samples


def test_rm_resumes_where_it_stopped(rm_run):
    run_dir, _ = rm_run
    result = rlctl("rm", "model.path=random:tiny", "steps=4", "pairs_per_step=8", "optim.micro_batch_size=4",
                   "data.pairs_per_problem=1", "checkpoint.every=2", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert "resumed from" in result.stdout and "step-000003" in result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/rm" in r] == [1, 2, 3, 4]


def test_the_centring_term_adds_c_times_the_mean_squared_sum_of_the_pair_scores(tmp_path):
    # Same pairs and initial weights with c = 0 and c = 0.5: the losses differ by exactly
    # c·(1/N)Σ(r_c + r_r)², computed here from the step's own mean scores only when N = 1, so one pair.
    plain, plain_metrics = one_step_gradient(tmp_path / "a", "pairs_per_step=1", "optim.micro_batch_size=1")
    _, centred_metrics = one_step_gradient(tmp_path / "b", "pairs_per_step=1", "optim.micro_batch_size=1",
                                           "center_rewards_coefficient=0.5")  # fmt: skip
    total = plain_metrics["rm/chosen"] + plain_metrics["rm/rejected"]  # one pair: the means are its scores
    assert float(centred_metrics["rm/centring"]) == pytest.approx(0.5 * float(total) ** 2, rel=1e-5)
    assert float(centred_metrics["loss/rm"]) == pytest.approx(
        float(plain_metrics["loss/rm"]) + 0.5 * float(total) ** 2, rel=1e-5
    )
    assert float(plain_metrics["rm/centring"]) == 0.0


def test_with_centring_micro_batches_still_give_the_update_of_the_whole_batch(tmp_path):
    whole, whole_metrics = one_step_gradient(tmp_path / "a", "pairs_per_step=8", "optim.micro_batch_size=8",
                                             "center_rewards_coefficient=0.01")  # fmt: skip
    split, metrics = one_step_gradient(tmp_path / "b", "pairs_per_step=8", "optim.micro_batch_size=3",
                                       "center_rewards_coefficient=0.01")  # fmt: skip
    assert metrics["loss/rm"] == pytest.approx(whole_metrics["loss/rm"], abs=1e-6)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "command, overrides, message",
    [
        ("rm", ["data.source=jsonl"], "data.path: the jsonl source needs a file of preference pairs"),
        ("rm", ["optim.minibatch_size=4"], "optim.minibatch_size: rlctl rm makes one update"),
        ("rm", ["data.eval_fraction=1.5"], "data.eval_fraction: must be in [0, 1)"),
        ("rm", ["center_rewards_coefficient=-1"], "center_rewards_coefficient: must be ≥ 0 (0 = off), got -1.0"),
        ("train", ["recipe=smoke", "reward=model"], "reward.model_path: the reward_model term needs it"),
        ("train", ["recipe=smoke", "reward=model", "reward.model_path=/nope"], "reward.model_path: no such folder"),
        ("train", ["recipe=smoke", "reward=http"], "reward.url: the http term needs it"),
        ("train", ["recipe=smoke", "reward=http", "reward.url=localhost:8000"], "reward.url: must start with http://"),
    ],
)
def test_rlhf_mistakes_get_one_line(command, overrides, message, tmp_path):
    extra = ["model.path=random:tiny"] if command == "rm" else []
    result = rlctl_here(command, *extra, *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_a_causal_lm_as_the_reward_model_is_refused_in_one_line(tmp_path, tiny_model, tokenizer):
    tiny_model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    result = rlctl("train", "recipe=smoke", "reward=model", f"reward.model_path={tmp_path / 'lm'}",
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)  # fmt: skip
    assert result.returncode != 0 and "is not a reward model (LlamaForCausalLM" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_preference_file_is_named_with_its_row(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    result = rlctl("rm", "model.path=random:tiny", "data.source=jsonl", f"data.path={data}",
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)  # fmt: skip
    assert f"data: row {data}:2 has no field 'rejected'" in result.stderr and "Traceback" not in result.stderr
