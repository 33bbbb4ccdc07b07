"""Will it fit: the memory plan of a run, per process, before anything loads.

The model's sizes come from its config alone (a model built on the meta device: exact parameter
counts for any architecture, no weights read). The terms, in bytes, with P parameters, T trainable,
N processes, L the largest layer's parameters:

- weights: P × dtype bytes; under ZeRO-3 P/N × 2 (16-bit) or × 4, plus 4·L for the layer being gathered.
- gradients and optimiser state follow DeepSpeed's own accounting, so that the plan's model states
  equal ``estimate_zero2/3_model_states_mem_needs`` where those apply: with mixed precision, 16-bit
  gradients (2 bytes) plus fp32 gradient partitions (4), fp32 master weights (4) and AdamW's two
  moments (8); stage 1 shards the optimiser, stage 2 also the gradients, stage 3 also the weights.
  Without DeepSpeed: fp32 gradients (4) and the two moments (8). Offloaded state is CPU memory.
- the reference (a second frozen copy, none under LoRA), the critic (its body and head, trained like
  the policy), a trust-region run's conjugate-gradient vectors (6 × T × 4, no optimiser).
- the rollout engine's copy (P × its dtype) and KV cache (on GPU vLLM takes
  ``gpu_memory_utilization`` of the device for both; on CPU the cache rlctl sizes for the rollout).
- activations of the largest micro-batch: per token and layer the tensors a decoder layer keeps for
  its backward pass (≈ 8·h + 2·kv + 5·i values: norms, q/k/v, attention output, the MLP's gate, up,
  activation and product; i the intermediate width, the active experts' for a mixture of experts),
  and with gradient checkpointing only each layer's input (h) plus one layer recomputed at a time.
- the log-prob chunk: the LM head's logits for ``chunk_tokens`` tokens in fp32, with their
  log-softmax and gradient (3 × chunk × vocab × 4).
- a trust-region run's Fisher products: the double backward keeps, for all Fisher rows at once (not
  micro-batched), the forward graph and the first backward's graph over every token, the math
  attention kernel's weights (heads × length per token and layer: the only kernel with second
  derivatives), FISHER_VOCAB_TENSORS fp32 tensors of rows × response × vocab (the full-vocabulary
  log-probs, their old copy, the KL's terms and their gradients) and FISHER_PARAMETER_VECTORS
  fp32 vectors of the trainable size (the first derivative kept with its graph, each product's
  per-parameter pieces). The bytes per value are measured, not derived: ``scripts/fisher_memory.py``
  prints the measured peak beside this row (SmolLM2-135M: 13.9 B per value under bf16 autocast,
  18.7 B in fp32, 13.6 vocab tensors).
- the process itself (on CPU: the interpreter and libraries, measured now).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CG_VECTORS = 6  # x, r, p, F·p, g and the tried step, each the size of the trainable parameters
FISHER_BYTES_PER_VALUE = {"bf16": 14, "fp16": 14, "no": 19}  # both graphs of the double backward, measured
FISHER_VOCAB_TENSORS = 14  # fp32 [rows, response, vocab] tensors alive during a Fisher product, measured
FISHER_PARAMETER_VECTORS = 3  # fp32 vectors of the trainable size beyond the CG vectors, measured


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its config."""

    architecture: str
    parameters: int  # unique parameters (tied embeddings once)
    body: int  # without the LM head (a critic's backbone); equal to parameters when the head is tied
    largest_layer: int  # parameters of the largest module DeepSpeed gathers at once under ZeRO-3
    lora_shapes: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every linear layer but the head
    hidden: int
    layers: int
    vocab: int
    kv_width: int  # key/value heads × head size
    heads: int  # attention heads (the math kernel keeps their weights for a double backward)
    intermediate: int  # MLP width a token passes through (active experts' for a mixture of experts)
    experts: int  # 0 for a dense model

    def lora_parameters(self, r: int, targets: list[str]) -> int:
        """Trainable parameters of rank-r adapters on the target linear layers: r·(in + out) each."""
        wanted = ["all-linear"] if targets == ["all-linear"] else targets

        def matches(name: str) -> bool:
            return wanted == ["all-linear"] or any(name == t or name.endswith("." + t) for t in wanted)

        return sum(r * (n_in + n_out) for name, n_in, n_out in self.lora_shapes if matches(name))


def shape_of(config) -> ModelShape:
    """The sizes of the causal LM ``config`` describes, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    unique = {id(p): p.numel() for p in model.parameters()}
    head = model.get_output_embeddings()
    tied = head is not None and any(head.weight is p for p in model.get_input_embeddings().parameters())
    head_size = 0 if head is None or tied else head.weight.numel()
    decoder_layers = [sum(p.numel() for p in layer.parameters()) for layer in _decoder_layers(model)]
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0
    if experts:
        intermediate = (getattr(text, "num_experts_per_tok", 1) or 1) * (
            getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        )
    else:
        intermediate = text.intermediate_size
    linear = tuple(
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    embedding = model.get_input_embeddings().weight.numel()
    return ModelShape(
        architecture=type(model).__name__, parameters=sum(unique.values()),
        body=sum(unique.values()) - head_size,
        largest_layer=max([embedding, head_size, *decoder_layers]),
        lora_shapes=linear, hidden=text.hidden_size, layers=text.num_hidden_layers, vocab=text.vocab_size,
        kv_width=kv_heads * head_dim, heads=heads, intermediate=intermediate, experts=experts,
    )  # fmt: skip


def _decoder_layers(model) -> list[torch.nn.Module]:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


@dataclass(frozen=True)
class PlanInputs:
    """The settings a run's memory depends on (``plan_inputs`` reads them from the config)."""

    shape: ModelShape
    world_size: int = 1
    zero_stage: int | None = None  # None: no DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "no"  # no | bf16 | fp16
    dtype: str = "float32"  # the weights' own dtype (model.dtype)
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ("all-linear",)
    gradient_checkpointing: bool = False
    micro_batch_tokens: int = 1024
    chunk_tokens: int = 1024
    needs_reference: bool = True
    needs_critic: bool = False
    critic_lora_r: int = 0
    trust_region: bool = False
    fisher_rows: int = 0  # trust region: the minibatch's samples the Fisher products run on, at once
    sequence_tokens: int = 0  # the longest row: prompt + response limits
    response_tokens: int = 0  # rollout.max_new_tokens (+ observations, multi-turn)
    rollout: str = "hf"  # hf | vllm
    engine_bytes: int = 0  # the rollout engine's KV cache (CPU) or its whole share (GPU), bytes
    on_gpu: bool = False
    process_bytes: int = 0  # the process before anything loads (CPU: measured)


@dataclass(frozen=True)
class Plan:
    rows: tuple[tuple[str, int, str], ...]  # (term, bytes on the device, how it was counted)
    cpu_rows: tuple[tuple[str, int], ...]  # offloaded state, in CPU memory even on a GPU run
    model_states: int  # weights + gradients + optimiser of the policy (DeepSpeed's estimator's scope)
    on_gpu: bool = False  # on a CPU run the device is the CPU: offloading saves nothing

    @property
    def total(self) -> int:
        offloaded = 0 if self.on_gpu else sum(b for _, b in self.cpu_rows)
        return sum(b for _, b, _ in self.rows) + offloaded


def _policy_states(inputs: PlanInputs, parameters: int, trainable: int, largest: int) -> list[tuple[str, int, str]]:
    """Weights, gradients and optimiser state of one trained model, on the device, per process."""
    n, stage = inputs.world_size, inputs.zero_stage
    mixed = inputs.precision in ("bf16", "fp16") and stage is not None
    weight_bytes = 2 if mixed else DTYPE_BYTES[inputs.dtype]
    if stage == 3:
        weights = (parameters * weight_bytes) // n + 4 * largest
        weights_note = f"{weight_bytes} B × P/{n} + 4 B × largest layer {largest / 1e6:.1f}M (gathered)"
    else:
        weights = parameters * weight_bytes
        weights_note = f"{weight_bytes} B × {parameters / 1e6:.1f}M"
    if inputs.trust_region:
        return [("weights", weights, weights_note), ("gradients", trainable * 4, "4 B × trainable"),
                ("optimiser state", CG_VECTORS * trainable * 4, f"none: {CG_VECTORS} CG vectors × 4 B × trainable")]  # fmt: skip
    if stage is None:
        grads, grads_note = trainable * 4, "4 B × trainable"
        optim, optim_note = trainable * 8, "AdamW m, v: 8 B × trainable"
    else:
        shard_grads = n if stage >= 2 else 1
        shard_optim = n if stage >= 1 else 1
        grads = (
            (trainable * 2) // shard_grads + (trainable * 4) // shard_optim if mixed else (trainable * 4) // shard_grads
        )
        grads_note = (f"2 B /{shard_grads} + fp32 4 B /{shard_optim} × trainable" if mixed
                      else f"4 B × trainable /{shard_grads}")  # fmt: skip
        optim = (trainable * 12) // shard_optim
        optim_note = f"fp32 master + m + v: 12 B × trainable /{shard_optim}"
        if stage == 3 and mixed:  # stage 3 reduces straight into the fp32 partition: no whole 16-bit gradient
            grads, grads_note = (trainable * 4) // n, f"fp32 4 B × trainable /{n}"
    return [
        ("weights", weights, weights_note),
        ("gradients", grads, grads_note),
        ("optimiser state", optim, optim_note),
    ]


def _activations(inputs: PlanInputs) -> tuple[int, str]:
    s = inputs.shape
    value_bytes = 2 if inputs.precision in ("bf16", "fp16") else 4
    per_layer = 8 * s.hidden + 2 * s.kv_width + 5 * s.intermediate
    tokens = inputs.micro_batch_tokens
    if inputs.gradient_checkpointing:
        values = tokens * (s.layers * s.hidden + per_layer)
        note = f"{tokens} tokens × (layers × h + one layer), checkpointed"
    else:
        values = tokens * s.layers * per_layer
        note = f"{tokens} tokens × {s.layers} layers × (8h + 2kv + 5i)"
    return values * value_bytes, note


def _fisher_products(inputs: PlanInputs) -> tuple[int, str]:
    """The double backward's graphs over the Fisher rows (module docstring)."""
    s, rows, length = inputs.shape, inputs.fisher_rows, inputs.sequence_tokens
    per_token = s.layers * (8 * s.hidden + 2 * s.kv_width + 5 * s.intermediate + s.heads * length)
    body = rows * length * per_token * FISHER_BYTES_PER_VALUE[inputs.precision]
    vocab = FISHER_VOCAB_TENSORS * rows * inputs.response_tokens * s.vocab * 4
    trainable = s.lora_parameters(inputs.lora_r, list(inputs.lora_targets)) if inputs.lora_r else s.parameters
    vectors = FISHER_PARAMETER_VECTORS * trainable * 4
    note = (
        f"{rows} rows × {length} tokens, all at once: graphs {body / GIB:.2f} + vocab {vocab / GIB:.2f} + "
        f"{FISHER_PARAMETER_VECTORS} vectors {vectors / GIB:.2f} (algo.fisher_fraction sets the rows)"
    )
    return body + vocab + vectors, note


def memory_plan(inputs: PlanInputs) -> Plan:
    """Every term of one process's peak, in bytes (module docstring)."""
    s = inputs.shape
    trainable = s.lora_parameters(inputs.lora_r, list(inputs.lora_targets)) if inputs.lora_r else s.parameters
    states = _policy_states(inputs, s.parameters, trainable, s.largest_layer)
    cpu_rows: list[tuple[str, int]] = []
    if inputs.offload_optimizer and inputs.zero_stage is not None:  # gradients and the update move to the CPU too
        moved = [r for r in states if r[0] in ("gradients", "optimiser state")]
        cpu_rows += [(name, b) for name, b, _ in moved]
        states = [r if r[0] == "weights" else (r[0], 0, "offloaded to the CPU") for r in states]
    model_states = sum(b for _, b, _ in states)
    rows = [(f"policy {name}", b, note) for name, b, note in states]
    weight_bytes = (
        2 if inputs.precision in ("bf16", "fp16") and inputs.zero_stage is not None else DTYPE_BYTES[inputs.dtype]
    )
    if inputs.needs_reference and not inputs.lora_r:
        shard = inputs.world_size if inputs.zero_stage == 3 else 1
        rows.append(
            ("reference", (s.parameters * weight_bytes) // shard, "a frozen copy" + (f" /{shard}" if shard > 1 else ""))
        )
    if inputs.needs_critic:
        critic_trainable = s.lora_parameters(inputs.critic_lora_r, ["all-linear"]) if inputs.critic_lora_r else s.body
        critic = replace(inputs, trust_region=False)
        rows.append(("critic", sum(b for _, b, _ in _policy_states(critic, s.body, critic_trainable, s.largest_layer)),
                     "body + value head: weights, gradients, optimiser"))  # fmt: skip
    if inputs.rollout == "vllm":
        engine_weights = s.parameters * (4 if inputs.precision == "no" else 2)
        if inputs.on_gpu:
            rows.append(("rollout engine (weights + KV cache)", inputs.engine_bytes, "gpu_memory_utilization × device"))
        else:
            rows.append(("rollout engine weights", engine_weights, "its own copy"))
            rows.append(("rollout engine KV cache", inputs.engine_bytes, "sized for one rollout"))
    activations, note = _activations(inputs)
    other, _ = _activations(replace(inputs, gradient_checkpointing=not inputs.gradient_checkpointing))
    note += f"; {'without' if inputs.gradient_checkpointing else 'with'} gradient checkpointing {other / GIB:.2f} GiB"
    rows.append(("activations (largest micro-batch)", activations, note))
    rows.append(
        (
            "log-prob chunk",
            3 * inputs.chunk_tokens * s.vocab * 4,
            f"3 × {inputs.chunk_tokens} tokens × vocab {s.vocab} × 4 B",
        )
    )
    if inputs.trust_region and inputs.fisher_rows:
        fisher, note = _fisher_products(inputs)
        rows.append(("Fisher products (trust region)", fisher, note))
    if inputs.process_bytes:
        rows.append(
            ("this process before loading", inputs.process_bytes, "measured now (interpreter, torch, libraries)")
        )
    return Plan(tuple(rows), tuple(cpu_rows), model_states, inputs.on_gpu)


def deepspeed_estimate(inputs: PlanInputs) -> int | None:
    """DeepSpeed's own estimate of the model states on one device (its 16-bit accounting), or None
    where it has none (no DeepSpeed, stage 0/1, LoRA, fp32)."""
    if inputs.zero_stage not in (2, 3) or inputs.lora_r or inputs.precision == "no" or inputs.trust_region:
        return None
    p = inputs.shape.parameters
    if inputs.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(p, inputs.world_size, 1, cpu_offload=inputs.offload_optimizer)[1]
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return estimate_zero3_model_states_mem_needs(
        p, inputs.shape.largest_layer, inputs.world_size, 1, cpu_offload=inputs.offload_optimizer,
        cpu_offload_params=inputs.offload_params,
    )[1]  # fmt: skip


# Settings that shrink a plan, each as (override, how it changes the inputs), tried one at a time.
REMEDIES = (
    ("model.lora.r=16", lambda i: replace(i, lora_r=16) if not i.lora_r and not i.trust_region else None),
    ("model.gradient_checkpointing=true", lambda i: replace(i, gradient_checkpointing=True) if not i.gradient_checkpointing else None),
    ("deepspeed=zero3", lambda i: replace(i, zero_stage=3) if i.world_size > 1 and (i.zero_stage or 0) < 3 and not i.trust_region else None),
    ("deepspeed.offload_optimizer=true", lambda i: replace(i, offload_optimizer=True) if i.zero_stage and not i.offload_optimizer else None),
    ("optim.micro_batch_size=<half>", lambda i: replace(i, micro_batch_tokens=i.micro_batch_tokens // 2) if i.micro_batch_tokens > 1 else None),
    ("algo.fisher_fraction=<half>", lambda i: replace(i, fisher_rows=i.fisher_rows // 2) if i.trust_region and i.fisher_rows > 1 else None),
    ("rollout=hf", lambda i: replace(i, rollout="hf", engine_bytes=0) if i.rollout == "vllm" else None),
    ("rollout.gpu_memory_utilization=<lower>", lambda i: replace(i, engine_bytes=i.engine_bytes // 2) if i.rollout == "vllm" and i.on_gpu else None),
)  # fmt: skip


def remedies(inputs: PlanInputs, count: int = 3) -> list[tuple[str, int]]:
    """The ``count`` settings that would save the most, each with the bytes it saves."""
    total = memory_plan(inputs).total
    saved = []
    for override, change in REMEDIES:
        changed = change(inputs)
        if changed is not None:
            saved.append((override, total - memory_plan(changed).total))
    return sorted((s for s in saved if s[1] > 0), key=lambda s: -s[1])[:count]


def device_memory(on_gpu: bool) -> tuple[int, str]:
    """What the run may use: free GPU memory, or the RAM available now plus what this process holds."""
    if on_gpu:
        free, _ = torch.cuda.mem_get_info()
        return free, "free GPU memory"
    import psutil

    return psutil.virtual_memory().available + process_bytes(), "available RAM"


def process_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def gib(value: int) -> str:
    return f"{value / GIB:6.2f} GiB"


def describe(plan: Plan, inputs: PlanInputs, budget: tuple[int, str] | None = None) -> str:
    """The plan as the dry run and the start of a run print it."""
    lines = [f"memory plan per process ({inputs.shape.architecture}, {inputs.shape.parameters / 1e6:.1f}M parameters, "
             f"{inputs.world_size} process{'es' if inputs.world_size > 1 else ''}"
             f"{f', ZeRO-{inputs.zero_stage}' if inputs.zero_stage is not None else ''}):"]  # fmt: skip
    for name, size, note in plan.rows:
        lines.append(f"  {name:<36} {gib(size)}   {note}")
    estimate = deepspeed_estimate(inputs)
    states_line = f"  {'model states (policy)':<36} {gib(plan.model_states)}"
    if estimate is not None:
        states_line += f"   DeepSpeed's estimator: {gib(estimate).strip()}"
    lines.append(states_line)
    for name, size in plan.cpu_rows:
        lines.append(
            f"  {'offloaded ' + name + ' (CPU)':<36} {gib(size)}"
            + ("" if inputs.on_gpu else "   in the total: the device is the CPU")
        )
    lines.append(f"  {'total':<36} {gib(plan.total)}")
    if budget is not None:
        available, what = budget
        lines[-1] += f"   of {gib(available).strip()} {what}"
        if plan.total > available:
            helps = ", ".join(f"{o} (−{s / GIB:.2f} GiB)" for o, s in remedies(inputs))
            lines.append(f"warning: the plan needs {plan.total / GIB:.2f} GiB, more than the {available / GIB:.2f} GiB "
                         f"of {what}; what would help most: {helps or 'a larger device'}")  # fmt: skip
    return "\n".join(lines)


def plan_inputs(cfg, settings, shape: ModelShape, rollout_sequences: int) -> PlanInputs:
    """The plan's inputs from a composed ``train`` config and its checked settings; ``rollout_sequences``:
    the most sequences one rollout asks the engine for (what its CPU KV cache is sized for)."""
    from rlctl.optim.scoring import LOGPROB_CHUNK_TOKENS
    from rlctl.optim.trust_region import fisher_row_count

    on_gpu = torch.cuda.is_available()
    layout, zero, algo = settings.layout, settings.zero, settings.algo
    engine_bytes = 0
    if settings.sampling.backend == "vllm":
        if on_gpu:
            engine_bytes = int(settings.vllm.gpu_memory_utilization * torch.cuda.mem_get_info()[1])
        elif settings.vllm.kv_cache_gib:
            engine_bytes = int(settings.vllm.kv_cache_gib * GIB)
        else:
            from rlctl.rollout.vllm import kv_cache_bytes

            max_len = settings.vllm.max_model_len or layout.max_prompt_tokens + layout.max_new_tokens
            engine_bytes = kv_cache_bytes(shape.layers, shape.kv_width, cfg.engine.precision, max_len,
                                          rollout_sequences)  # fmt: skip
    return PlanInputs(
        shape=shape, world_size=settings.ranks.world_size, zero_stage=zero.stage if zero.enabled else None,
        offload_optimizer=zero.offload_optimizer, offload_params=zero.offload_params, precision=cfg.engine.precision,
        dtype=cfg.model.dtype, lora_r=settings.lora.r, lora_targets=tuple(settings.lora.target_modules),
        gradient_checkpointing=cfg.model.gradient_checkpointing, micro_batch_tokens=layout.largest_micro_batch_tokens,
        chunk_tokens=LOGPROB_CHUNK_TOKENS, needs_reference=algo.needs_reference, needs_critic=algo.needs_values,
        critic_lora_r=cfg.critic.lora.r, trust_region=algo.trust_region, rollout=settings.sampling.backend,
        fisher_rows=fisher_row_count(layout.minibatch_size, algo.fisher_fraction) if algo.trust_region else 0,
        sequence_tokens=layout.max_prompt_tokens + layout.max_new_tokens, response_tokens=layout.max_new_tokens,
        engine_bytes=engine_bytes, on_gpu=on_gpu, process_bytes=0 if on_gpu else process_bytes(),
    )  # fmt: skip


def model_shape(cfg) -> ModelShape:
    """The shape of the run's model (``model.path``), from its config: no weights are read."""
    from rlctl.models import config_of

    return shape_of(config_of(cfg.model.path, cfg.model.trust_remote_code))


def checked_model_shape(cfg, settings) -> ModelShape:
    """The run's model shape, and what its config alone can refuse before any weights load: an
    architecture the rollout engine cannot serve, LoRA targets the model does not have."""
    shape = model_shape(cfg)
    if settings.sampling.backend == "vllm":
        from rlctl.rollout.vllm import check_architecture

        check_architecture(shape.architecture, shape.experts, torch.cuda.is_available())
    check_lora_targets(cfg, settings, shape)
    return shape


def check_lora_targets(cfg, settings, shape: ModelShape) -> None:
    """The policy's and the critic's LoRA targets name linear layers the model has (before it loads)."""
    from rlctl.lora import check_targets

    names = [name for name, _, _ in shape.lora_shapes]
    if settings.lora.enabled:
        check_targets(names, list(settings.lora.target_modules))
    if settings.algo.needs_values and cfg.critic.lora.r > 0:
        check_targets(names, list(cfg.critic.lora.target_modules), "critic.lora.target_modules")


def plan_for(cfg, settings, shape: ModelShape, rollout_sequences: int) -> str:
    """The printed plan of a train config against the device."""
    inputs = plan_inputs(cfg, settings, shape, rollout_sequences)
    return describe(memory_plan(inputs), inputs, device_memory(inputs.on_gpu))
