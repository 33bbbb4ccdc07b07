"""LoRA: merged weights are W + (alpha/r)·B A under the base model's names; the reference is the
policy with its adapter off (no copy); step checkpoints hold the adapter, the final one the merged
model and the adapter; a resumed run continues the adapter it saved."""

import copy
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlctl.build import build_train
from rlctl.checkpoint import latest_checkpoint
from rlctl.cli import CONF_DIR
from rlctl.config import register_schemas
from rlctl.errors import RlctlError
from rlctl.lora import AdapterDisabled, LoraSpec, add_adapter, merged_weights
from rlctl.models import load_causal_lm
from rlctl.optim.scoring import response_logprobs
from rlctl.trainer import TrainState, train, train_step

VARYING = "reward.terms=[{name: format, pattern: ing}]"  # a reward the tiny model sometimes earns


def compose_train(*overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=["recipe=smoke", "logger.console=false", "eval.enabled=false",
                                           "engine.precision=no", *overrides])  # fmt: skip


def spec(**changes) -> LoraSpec:
    return LoraSpec(**{"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["all-linear"], **changes})


def with_trained_adapter(tokenizer, seed=1):
    """The tiny model with a rank-4 adapter whose B is not 0 (as after training)."""
    model = add_adapter(load_causal_lm("random:tiny", tokenizer, seed=0), spec())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def test_merged_weights_are_w_plus_scaled_b_a_under_the_base_names(tokenizer):
    model = with_trained_adapter(tokenizer)
    merged = dict(merged_weights(model.state_dict().items(), scaling=8.0 / 4))
    base_names = set(load_causal_lm("random:tiny", tokenizer, seed=0).state_dict())
    assert set(merged) == base_names
    # By hand for one layer: W + (alpha / r)·B A, alpha = 8, r = 4.
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected_q = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected_q)
    # And against peft's own merge of every layer.
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, msg=name)


def test_a_new_adapter_computes_what_the_base_model_does_and_only_it_trains(tokenizer):
    base = load_causal_lm("random:tiny", tokenizer, seed=0)
    adapted = add_adapter(load_causal_lm("random:tiny", tokenizer, seed=0), spec())
    ids = torch.randint(3, 200, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, base(input_ids=ids).logits)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_the_reference_is_the_policy_with_its_adapter_off(tokenizer):
    model = with_trained_adapter(tokenizer)
    base = load_causal_lm("random:tiny", tokenizer, seed=0)
    ids = torch.randint(3, 200, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        off, _ = response_logprobs(AdapterDisabled(model), ids, mask, 4)
        on, _ = response_logprobs(model, ids, mask, 4)
        expected, _ = response_logprobs(base, ids, mask, 4)
    torch.testing.assert_close(off, expected)
    assert not torch.allclose(on, expected, atol=1e-3)  # the adapter is back on outside the reference
    assert not list(AdapterDisabled(model).parameters())  # it holds no weights of its own


def test_a_lora_run_keeps_the_adapter_in_step_checkpoints_and_a_merged_model_in_final(tmp_path):
    stages = build_train(compose_train("model.lora.r=4", "algo.kl_coef=0.05", VARYING, "optim.lr=5e-2",
                                       "checkpoint.every=1", "steps=2"), tmp_path)  # fmt: skip
    assert isinstance(stages.reference, AdapterDisabled)
    policy = stages.policy.unwrapped()
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in policy.parameters()) // 10
    torch.manual_seed(0)
    metrics = train_step(stages, TrainState(step=1))
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # sampled before any update: policy = base = reference
    train(stages)
    step = latest_checkpoint(tmp_path)
    saved = sorted(p.name for p in (step / "policy").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    final = tmp_path / "checkpoints" / "final"
    served = AutoModelForCausalLM.from_pretrained(final)  # a plain model: the adapter merged in
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        base = load_causal_lm("random:tiny", stages.tokenizer, seed=0)
        assert not torch.allclose(served(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)


def test_a_resumed_lora_run_continues_its_adapters_bitwise(tmp_path):
    # PPO: the policy and the critic each with an adapter; the split run resumes both from step 2.
    common = ["algo=ppo", "model.lora.r=4", "critic.lora.r=4", "algo.kl_coef=0.05", VARYING, "optim.lr=5e-2",
              "critic.lr=5e-2", "checkpoint.every=2"]  # fmt: skip
    train(build_train(compose_train("steps=3", *common), tmp_path / "straight"))
    train(build_train(compose_train("steps=2", *common), tmp_path / "split"))
    critic_saved = sorted(p.name for p in (latest_checkpoint(tmp_path / "split") / "critic").iterdir())
    assert "adapter_model.safetensors" in critic_saved and "value_head.safetensors" in critic_saved
    resumed = build_train(compose_train("steps=3", *common), tmp_path / "split")
    critic = resumed.critic.unwrapped()
    assert all("lora_" in n or n.startswith("head.") for n, p in critic.named_parameters() if p.requires_grad)
    train(resumed)

    def final_weights(run):
        return load_file(run / "checkpoints" / "final" / "model.safetensors")

    straight, split = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    for name, value in straight.items():
        assert torch.equal(split[name], value), name


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lora.r=-1", "model.lora.r: must be ≥ 0"),
        ("model.lora.target_modules=[]", "model.lora.target_modules: must name at least one module"),
        ("model.lora.dropout=1.5", "model.lora.dropout: must be in [0, 1)"),
    ],
)
def test_lora_mistakes_name_the_key(override, message, tmp_path):
    with pytest.raises(RlctlError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_train(compose_train(override), tmp_path)


def test_a_target_module_the_model_lacks_is_named(tmp_path):
    with pytest.raises(RlctlError, match="model.lora.target_modules"):
        build_train(compose_train("model.lora.r=4", "model.lora.target_modules=[no_such_proj]"), tmp_path)
