"""The memory plan (rlctl/plan.py) by hand and against DeepSpeed's own estimator; the hub presets as
far as they can be checked offline; `rlctl doctor`; the one-line refusals that come from a model's
config before it loads."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from test_cli import rlctl

from rlctl.cli import CONF_DIR
from rlctl.errors import RlctlError
from rlctl.lora import check_targets
from rlctl.models import KNOWN_CONFIGS, RANDOM_ARCHITECTURES, config_of
from rlctl.plan import GIB, PlanInputs, deepspeed_estimate, describe, memory_plan, remedies, shape_of

TINY = shape_of(config_of("random:tiny"))


def rows(plan) -> dict[str, int]:
    return {name: size for name, size, _ in plan.rows}


def test_the_tiny_llama_has_the_parameters_counted_by_hand():
    # vocab 49152 × hidden 64 embeddings (tied with the head) = 3,145,728; per layer q 64·64, k and v
    # 64·32 (1 KV head of 32), o 64·64, gate/up/down 3 × 64·128, two norms 2 × 64: 36,992; 2 layers;
    # final norm 64 → 3,219,776. LoRA r=16 on every linear layer: 16·(in+out) each = 16,384 per layer.
    assert TINY.parameters == 3_145_728 + 2 * 36_992 + 64 == 3_219_776
    assert TINY.largest_layer == 3_145_728  # the embedding, the largest module ZeRO-3 gathers
    assert TINY.lora_parameters(16, ["all-linear"]) == 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert TINY.lora_parameters(16, ["q_proj", "v_proj"]) == 2 * 16 * (128 + 96)


def test_the_presets_parameter_counts_are_the_published_ones():
    # Qwen2.5 model cards: 0.49B and 1.54B parameters; SmolLM2: 135M.
    sizes = {hub_id: shape_of(config_of(hub_id)).parameters for hub_id in KNOWN_CONFIGS}
    assert round(sizes["Qwen/Qwen2.5-0.5B-Instruct"] / 1e7) == 49
    assert round(sizes["Qwen/Qwen2.5-1.5B-Instruct"] / 1e7) == 154
    assert round(sizes["HuggingFaceTB/SmolLM2-135M-Instruct"] / 1e6) == 135


def test_plain_training_holds_weights_gradients_and_two_moments_in_fp32():
    plan = rows(memory_plan(PlanInputs(shape=TINY, needs_reference=True)))
    p = TINY.parameters
    assert (plan["policy weights"], plan["policy gradients"], plan["policy optimiser state"]) == (4 * p, 4 * p, 8 * p)
    assert plan["reference"] == 4 * p


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_shards_what_it_partitions(stage):
    # Mixed precision, 4 processes, by hand: 16-bit weights 2 B (÷4 from stage 3), 16-bit gradients
    # 2 B (÷4 from stage 2) + fp32 gradient partitions 4 B (÷4 from stage 1), master + m + v 12 B
    # (÷4 from stage 1); stage 3 reduces into the fp32 partition only and gathers one layer (4 B × L).
    inputs = PlanInputs(shape=TINY, world_size=4, zero_stage=stage, precision="bf16", needs_reference=False)
    plan = rows(memory_plan(inputs))
    p, n, layer = TINY.parameters, 4, TINY.largest_layer
    expected = {
        0: (2 * p, 2 * p + 4 * p, 12 * p),
        1: (2 * p, 2 * p + 4 * p // n, 12 * p // n),
        2: (2 * p, 2 * p // n + 4 * p // n, 12 * p // n),
        3: (2 * p // n + 4 * layer, 4 * p // n, 12 * p // n),
    }[stage]
    assert (plan["policy weights"], plan["policy gradients"], plan["policy optimiser state"]) == expected


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("stage, offload", [(2, False), (2, True), (3, False), (3, True)])
def test_the_model_states_equal_deepspeeds_estimator(stage, offload, world_size):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    qwen = shape_of(config_of("Qwen/Qwen2.5-1.5B-Instruct"))
    inputs = PlanInputs(shape=qwen, world_size=world_size, zero_stage=stage, precision="bf16", offload_optimizer=offload,
                        offload_params=offload and stage == 3)  # fmt: skip
    if stage == 2:
        theirs = estimate_zero2_model_states_mem_needs(qwen.parameters, world_size, 1, cpu_offload=offload)[1]
    else:
        theirs = estimate_zero3_model_states_mem_needs(qwen.parameters, qwen.largest_layer, world_size, 1,
                                                       cpu_offload=offload, cpu_offload_params=offload)[1]  # fmt: skip
    plan = memory_plan(inputs)
    if stage == 3 and offload:  # DeepSpeed then keeps only the gathered layer on the device
        assert theirs == 4 * qwen.largest_layer
        return
    assert abs(plan.model_states - theirs) <= world_size  # integer division per term
    assert deepspeed_estimate(inputs) == theirs


def test_offloading_moves_state_off_a_gpu_but_saves_nothing_on_a_cpu():
    inputs = PlanInputs(shape=TINY, world_size=2, zero_stage=2, precision="bf16", offload_optimizer=True)
    on_cpu, on_gpu = memory_plan(inputs), memory_plan(replace(inputs, on_gpu=True))
    kept = memory_plan(replace(inputs, offload_optimizer=False))
    assert on_cpu.total == kept.total  # the offloaded gradients and moments are in the same RAM
    assert on_gpu.total == kept.total - sum(size for _, size in on_gpu.cpu_rows) < kept.total
    assert "deepspeed.offload_optimizer=true" not in [o for o, _ in remedies(replace(inputs, offload_optimizer=False))]


def test_lora_drops_the_reference_copy_and_trains_only_the_adapter():
    full = rows(memory_plan(PlanInputs(shape=TINY)))
    lora = rows(memory_plan(PlanInputs(shape=TINY, lora_r=16)))
    adapter = TINY.lora_parameters(16, ["all-linear"])
    assert "reference" in full and "reference" not in lora  # the base with the adapter off is the reference
    assert lora["policy gradients"] == 4 * adapter and lora["policy optimiser state"] == 8 * adapter


def test_gradient_checkpointing_keeps_one_hidden_state_per_layer_and_one_layer_whole():
    inputs = PlanInputs(shape=TINY, micro_batch_tokens=100, precision="no")
    plain = rows(memory_plan(inputs))["activations (largest micro-batch)"]
    checkpointed = rows(memory_plan(replace(inputs, gradient_checkpointing=True)))["activations (largest micro-batch)"]
    per_layer = 8 * 64 + 2 * 32 + 5 * 128  # 8h + 2·kv + 5·i values per token
    assert plain == 100 * 2 * per_layer * 4
    assert checkpointed == 100 * (2 * 64 + per_layer) * 4


def test_a_trust_region_plan_counts_the_fisher_graph_of_every_fisher_row_at_once():
    inputs = PlanInputs(shape=TINY, precision="no", trust_region=True, fisher_rows=8, sequence_tokens=100,
                        response_tokens=20, needs_reference=False)  # fmt: skip
    plan = rows(memory_plan(inputs))
    # both graphs: 8 rows × 100 tokens × 2 layers × (8h + 2kv + 5i + heads × 100 attention weights)
    # values × 19 B (fp32, measured); 14 fp32 tensors of 8 rows × 20 response tokens × vocab 49152;
    # 3 fp32 vectors of the 3,219,776 parameters.
    per_token = 2 * (8 * 64 + 2 * 32 + 5 * 128 + TINY.heads * 100)
    graphs, vocab, vectors = 8 * 100 * per_token * 19, 14 * 8 * 20 * 49152 * 4, 3 * 3_219_776 * 4
    assert plan["Fisher products (trust region)"] == graphs + vocab + vectors
    halved = rows(memory_plan(replace(inputs, fisher_rows=4)))["Fisher products (trust region)"]
    assert halved == (graphs + vocab) // 2 + vectors  # the rows' part is linear in the rows
    assert "algo.fisher_fraction=<half>" in dict(remedies(inputs))
    assert "Fisher products (trust region)" not in rows(memory_plan(replace(inputs, trust_region=False, fisher_rows=0)))


def test_a_plan_that_does_not_fit_warns_once_with_the_three_settings_that_save_most():
    qwen = shape_of(config_of("Qwen/Qwen2.5-1.5B-Instruct"))
    inputs = PlanInputs(shape=qwen, world_size=8, zero_stage=2, precision="bf16", micro_batch_tokens=4096)
    plan = memory_plan(inputs)
    text = describe(plan, inputs, (4 * GIB, "free GPU memory"))
    warning = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "more than the 4.00 GiB of free GPU memory" in warning[0]
    helps = remedies(inputs)
    assert len(helps) == 3 and [s for _, s in helps] == sorted((s for _, s in helps), reverse=True)
    # 4096 tokens × 28 layers × (8·1536 + 2·256 + 5·8960) values × 2 B = 12.3 GiB of activations: the largest term.
    assert helps[0][0] == "model.gradient_checkpointing=true"
    one_process = replace(inputs, world_size=1, zero_stage=None, micro_batch_tokens=256)
    assert remedies(one_process)[0][0] == "model.lora.r=16"  # there AdamW's 12 GiB of fp32 moments lead
    assert all(override in warning[0] for override, _ in helps)
    assert "warning" not in describe(plan, inputs, (1000 * GIB, "free GPU memory"))


# --- the presets, offline ---------------------------------------------------------------------


PRESETS = sorted((CONF_DIR / "model").glob("*.yaml"))
TESTED_ARCHITECTURES = {shape_of(config_of(f"random:{kind}")).architecture for kind in RANDOM_ARCHITECTURES}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_names_a_real_model_of_a_tested_architecture_with_keys_that_fit(preset: Path):
    settings = yaml.safe_load(preset.read_text())
    path = settings["path"]
    if path.startswith("random:"):
        assert path[len("random:") :] in RANDOM_ARCHITECTURES
    elif not path.startswith("embedded:"):
        assert path in KNOWN_CONFIGS, f"{preset.name}: {path} has no offline config in rlctl.models.KNOWN_CONFIGS"
    shape = shape_of(config_of(path))
    assert shape.architecture in TESTED_ARCHITECTURES
    names = [name for name, _, _ in shape.lora_shapes]
    check_targets(names, list(settings.get("lora", {}).get("target_modules", ["all-linear"])))
    if settings.get("gradient_checkpointing"):
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM._model_mapping[type(config_of(path))].supports_gradient_checkpointing


# --- one line, before any model loads -----------------------------------------------------------


def test_a_lora_target_the_model_lacks_lists_the_layers_it_has():
    phi3 = [name for name, _, _ in shape_of(config_of("random:phi3")).lora_shapes]
    with pytest.raises(RlctlError, match=r"^model.lora.target_modules: the model has no linear layer named 'q_proj'; "
                                         r"its linear layers: \['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj'\]"):  # fmt: skip
        check_targets(phi3, ["q_proj", "v_proj"])
    check_targets(phi3, ["qkv_proj"])


def test_an_architecture_vllm_does_not_know_is_refused_with_the_way_out():
    from rlctl.rollout.vllm import check_architecture

    with pytest.raises(
        RlctlError, match=r"^rollout=vllm: vLLM .* does not support the architecture MyNewForCausalLM; use rollout=hf"
    ):
        check_architecture("MyNewForCausalLM", 0, on_gpu=False)
    check_architecture("Qwen2ForCausalLM", 0, on_gpu=False)
    check_architecture("Qwen3MoeForCausalLM", 4, on_gpu=True)  # a GPU engine reloads expert weights


def test_a_hub_model_that_cannot_be_reached_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RlctlError, match=r"^model.path: cannot read the config of 'someone/not-cached-model'"):
        config_of("someone/not-cached-model")


def test_the_dry_run_prints_the_plan_for_eight_processes_without_launching(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = rlctl("train", "dry_run=true", "model=qwen-1.5b", "deepspeed=zero3", "rollout=hf").stdout
    assert "memory plan per process (Qwen2ForCausalLM, 1543.7M parameters, 8 processes, ZeRO-3)" in out
    assert "DeepSpeed's estimator:" in out
    assert "dry run: nothing loaded or trained" in out


def test_doctor_names_every_library_the_device_and_the_default_run():
    out = rlctl("doctor").stdout
    for library in ("torch", "transformers", "vllm", "deepspeed", "accelerate", "peft"):
        assert f" {library} " in out
    assert "device:" in out and "bf16:" in out
    assert "default precision: engine.precision=" in out and "default rollout: rollout=" in out
    assert out.strip().splitlines()[-1].startswith("verdict: ")
