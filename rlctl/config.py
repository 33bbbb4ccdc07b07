"""Structured config schemas. Every key lives here with its default and a one-line comment.

The YAML files under ``conf/`` only pick values; Hydra validates them against these dataclasses,
so ``optim.lrr=1`` fails with "Key 'lrr' not in 'OptimConfig'" and ``optim.lr=abc`` names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlctl.errors import RlctlError


@dataclass
class AlgoConfig:
    name: str = "grpo"  # label used in run names and logs
    advantage: str = "grpo"  # advantage estimator: gae | grpo | rloo | reinforce | reinforce_pp (gae builds a critic)
    policy_loss: str = "ppo_clip"  # policy loss: ppo_clip | gspo | pg | surrogate (unclipped ρ·A, for trust_region)
    group_size: int = 8  # completions sampled per prompt (G); group baselines need G ≥ 2
    scale_by_std: bool = True  # grpo: divide by the group's reward std (False = Dr.GRPO)
    # grpo: added to the std before dividing (TRL uses 1e-4; it matters when a group's std is tiny)
    std_eps: float = 1e-6
    # grpo: the std that divides: group (each prompt's G rewards) | batch (every reward of the step, all processes; TRL scale_rewards="batch")
    std_scope: str = "group"
    clip_low: float = 0.2  # ratio lower bound is 1 − clip_low
    clip_high: float = 0.2  # ratio upper bound is 1 + clip_high (DAPO's clip-higher raises it)
    dual_clip: float | None = None  # ppo_clip: bound the loss at −c·A for A < 0 (c > 1, e.g. 3); None = off
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    norm_by_max_new_tokens: bool = (
        False  # seq-mean-token-sum-norm: L = rollout.max_new_tokens (Dr.GRPO), else the minibatch's longest response
    )
    kl_coef: float = 0.0  # β of the KL(π‖π_ref) term (initial β when adaptive); 0 with no target loads no reference
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_placement: str = "in_loss"  # in_loss (GRPO) | in_reward (PPO: r_t −= β·KL_t)
    kl_target: float | None = None  # adaptive β: per-token KL to aim for; None = fixed β
    kl_horizon: int = 10000  # adaptive β: samples over which β may change by at most ±20%
    entropy_coef: float = 0.0  # bonus on the policy's entropy (0 = off)
    num_iterations: int = (
        1  # passes over each step's samples (μ); the ratio is to the sampling policy's stored log-probs
    )
    gamma: float = 1.0  # discount over response tokens (gae, reinforce_pp)
    lam: float = 0.95  # gae: λ, the bias/variance trade-off (0 = one-step TD, 1 = Monte Carlo)
    value_loss: str = "clipped_mse"  # critic loss: clipped_mse
    value_clip: float = 0.2  # clipped_mse: how far V may move from the rollout-time V before clipping
    vf_coef: float = 1.0  # weight of the value loss (the critic has its own optimiser)
    overlong_buffer: int = 0  # DAPO soft overlong punishment: last N tokens before the limit are penalised (0 = off)
    overlong_penalty: float = 1.0  # DAPO: penalty at the length limit
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, sample more prompts to refill
    sampling_retries: int = 3  # dynamic sampling: extra rollouts allowed per step to fill the batch
    update: str = "optimizer"  # the policy's update: optimizer (AdamW on the loss) | trust_region (TRPO's step)
    max_kl: float = 0.02  # trust_region: δ, the largest mean KL(π_old ‖ π_new) per trained token of one step
    cg_iters: int = 10  # trust_region: conjugate-gradient iterations for F⁻¹g
    cg_damping: float = 0.1  # trust_region: damping added to the Fisher matrix (F + damping·I); algo=trpo sets 10
    fisher_fraction: float = 1.0  # trust_region: share of the minibatch's samples the Fisher-vector products use
    line_search_steps: int = 10  # trust_region: backtracking tries Δ, Δ/2, … before keeping θ unchanged


@dataclass
class LoraConfig:
    r: int = 0  # LoRA rank; 0 = off (every weight trains)
    alpha: float = 32.0  # the adapter's output is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    # linear layers that get an adapter, by name or suffix; all-linear = every attention and MLP projection (not the LM head)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class CriticConfig:
    path: str | None = None  # initial weights (a causal LM or a reward model); None = the policy's model.path
    lr: float = 2e-5  # critic AdamW learning rate
    warmup_steps: int = 0  # steps at the start during which only the critic trains
    max_grad_norm: float = 1.0  # clip the critic's gradient norm (0 = off)
    # the critic's own adapter (r > 0); its value head trains whole
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # label used in run names and the model card
    path: str = "embedded:smollm2-135m"  # hub id, local folder, embedded:NAME or random:KIND (tiny, qwen2, qwen3, mistral, gemma, phi3, qwen3-moe)
    dtype: str = "float32"  # weight dtype: float32 | bfloat16 (mixed precision is engine.precision)
    trust_remote_code: bool = False  # run model code shipped with the checkpoint; only for sources you trust
    gradient_checkpointing: bool = False  # trade compute for activation memory
    # low-rank adapters on frozen weights (r > 0); the reference is the base
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    source: str = "arithmetic"  # arithmetic | gsm8k | jsonl | hf
    # jsonl: a JSONL, JSON, CSV or Parquet file, a save_to_disk folder or a hub id; gsm8k: a local copy; hf: a hub id
    path: str | None = None
    subset: str | None = None  # hf: dataset configuration name (gsm8k: "main")
    split: str = "train"  # split to train on (hf / gsm8k hub)
    eval_path: str | None = None  # held-out file; None: a split of `path` or `eval_split`
    eval_split: str = "test"  # hf / gsm8k hub: held-out split
    prompt_field: str = "question"  # row field holding the prompt (a string or chat messages)
    answer_field: str = "answer"  # row field holding the reference answer
    answer_format: str = "plain"  # plain | gsm8k (the final answer follows "####")
    prompt_template: str = "{prompt}"  # text around a string prompt; {prompt} is replaced
    system_prompt: str | None = None  # system message prepended to every chat
    chat_template: bool = True  # apply the tokenizer's chat template (when it has one)
    max_prompt_tokens: int = 512  # longer prompts are skipped or truncated (see overlong)
    overlong: str = "skip"  # skip | truncate (keeps the last max_prompt_tokens tokens)
    eval_size: int = 64  # held-out prompts used by evaluation (fewer if the source has fewer)
    eval_fraction: float = 0.2  # sources without a held-out split: share of rows (or problems) held out
    seed: int = 0  # seed of the data order and of generated tasks
    digits: int = 1  # arithmetic: digits per operand
    num_operands: int = 2  # arithmetic: operands per problem (operators = operands − 1)
    operators: str = "+"  # arithmetic: operators to draw from, any of "+-*"
    instruction: str = "Answer with just the number."  # arithmetic: what the prompt asks after "What is 3 + 4?"


@dataclass
class RewardTerm:
    name: str = "exact_number"  # exact_number | gsm8k | math_verify | format | reward_model | http
    weight: float = 1.0  # weight in the sum of terms
    pattern: str | None = None  # format: regex the completion must match (re.search, DOTALL)


@dataclass
class JudgeConfig:
    # judge term: a causal LM asked whether the reply is right; None = the policy's model.path
    model_path: str | None = None
    # judge term: question (the template as one user turn, quoting the reply) | conversation (the policy's chat, the reply
    # as the assistant's turn, then the template as the next user turn); None: the trained judge's own, else question
    form: str | None = None
    # judge term: the question, with {prompt} (the last user message), {completion} and {answer}; None: the one the
    # judge was trained with (rlctl rm head=judge), else the form's default ("Question … Reply … Reference answer …
    # Does the reply answer the question correctly? Answer Yes or No." | "Is your answer correct? Answer Yes or No.")
    template: str | None = None
    batch_size: int = 32  # judge term: samples per forward pass
    max_tokens: int = 1024  # judge term: a longer question keeps its last tokens


@dataclass
class RewardConfig:
    terms: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])  # weighted sum of these
    fn: str | None = None  # your own reward, "path/to/file.py:function"; replaces `terms` when set
    accuracy_term: int = 0  # index of the term whose score of 1 counts as a correct answer (accuracy=term)
    # what `accuracy` counts as correct: auto (the accuracy_term's score ≥ 1; with reward.fn, the exact-answer rule of
    # the data: gsm8k for data.answer_format=gsm8k, else exact_number) | term | exact_number | gsm8k | math_verify |
    # path/to/file.py:function (yours: (completion, answer) -> True/False)
    accuracy: str = "auto"
    timeout_s: float = 10.0  # a reward call running longer than this scores `fallback` (0 = no limit)
    fallback: float = 0.0  # score given when a reward function raises or times out
    on_error: str = "fallback"  # fallback (count it in reward/errors and go on) | stop (end the run)
    max_failed_steps: int = 2  # stop when a term fails on every sample for this many steps in a row
    # reward_model term: a one-label sequence classifier (hub id, folder, `rlctl rm` run), or a list of them (an ensemble)
    model_path: Any = None
    ensemble_penalty: float = 0.0  # reward_model ensemble: score = mean − penalty × std over the members (0 = the mean)
    model_batch_size: int = 32  # reward_model term: sequences per forward pass
    model_max_tokens: int = 1024  # reward_model term: longer prompt + completion texts keep their last tokens
    normalize: bool = False  # reward_model term: (score − running mean) / running std, the moments kept in checkpoints
    clip: float = 0.0  # reward_model term: clamp the (normalised) score to [−clip, clip] (0 = off)
    url: str | None = None  # http term: reward server; POST {prompts, completions, answers} -> {scores}
    headers: dict[str, str] = field(default_factory=dict)  # http: header -> env variable (+reward.headers.X=VAR)
    retries: int = 2  # http term: further tries after a connection error, a timeout (timeout_s) or a 429/5xx
    # judge term: score P(Yes) / (P(Yes) + P(No)) of a causal LM
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class RolloutConfig:
    backend: str = "vllm"  # generation backend: vllm (a vLLM engine beside training) | hf (transformers generate)
    max_new_tokens: int = 16  # completion length limit
    temperature: float = 1.0  # sampling temperature (also divides logits when scoring)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # 0 = off
    batch_size: int = 64  # hf: sequences per generate call (vllm schedules its own batches)
    is_correction: str = "tis"  # none | tis: weight each token's loss by min(π_train/π_rollout, is_cap) (vllm only)
    is_cap: float = 2.0  # C of truncated importance sampling
    gpu_memory_utilization: float = 0.3  # vllm on GPU: share of GPU memory for its weights and KV cache
    kv_cache_gib: float = 0.0  # vllm: KV cache size in GiB (0 = from gpu_memory_utilization on GPU; on CPU room for one rollout's sequences, ≤ 2 GiB)
    max_model_len: int = 0  # vllm: longest prompt + completion (0 = data.max_prompt_tokens + max_new_tokens)
    enforce_eager: bool | None = None  # vllm: no CUDA graphs / compilation (None = eager on CPU, graphs on GPU)
    sleep_during_update: bool | None = None  # vllm: free its KV cache while training (None = on GPU, off on CPU)
    tensor_parallel_size: int = 1  # vllm: GPUs one engine spans (a single-process run on several GPUs)


@dataclass
class EnvConfig:
    name: str = "none"  # none (one reply per prompt) | calculator (a tool that works out arithmetic) | tools (env.tools) | custom (env.cls)
    # custom: path/to/file.py:ClassName, a class with reset(task) -> messages and step(reply) -> Step
    cls: str | None = None
    # tools: typed functions with docstrings, path/to/file.py:function each
    tools: list[str] = field(default_factory=list)
    max_turns: int = 4  # replies of the policy per trajectory (each up to rollout.max_new_tokens)
    max_observation_tokens: int = 64  # longer observations (tool results) are cut to this many tokens, and counted
    max_total_tokens: int = 0  # replies and observations of one trajectory together (0 = what max_turns allows)
    mask_truncated: bool = False  # trajectories that hit a limit (or whose environment failed) take no part in the loss
    # a tool call running longer returns an error to the policy (and counts as a tool error)
    tool_timeout_s: float = 5.0


@dataclass
class OptimConfig:
    lr: float = 2e-5  # AdamW learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW β1, β2
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    eps: float = 1e-8  # AdamW ε
    schedule: str = "constant"  # constant | linear | cosine (after warm-up)
    warmup_steps: int = 0  # linear warm-up, in optimiser updates
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 = off)
    minibatch_size: int = 0  # samples per optimiser update, per process (0 = the step's whole batch)
    micro_batch_size: int = 8  # samples per forward/backward (gradient accumulation inside a minibatch); the update's activations scale with it
    # train: tokens per forward/backward, rows × (longest prompt + longest response); rows of like length grouped (0 = micro_batch_size rows)
    max_tokens_per_micro_batch: int = 0
    # train: a group's completions are scored after one copy of their prompt (same values, fewer tokens; sdpa/eager attention)
    share_prompts: bool = True


@dataclass
class EngineConfig:
    # no | bf16 | fp16 mixed precision (fp32 master weights); default: bf16 where the hardware computes it
    # (a bf16 GPU, a CPU with AMX or AVX512-BF16), else no (elsewhere bf16 autocast runs ~5x slower than fp32)
    precision: str = "${rlctl_native_precision:}"
    seed: int = 0  # seeds python, numpy and torch
    # glibc keeps freed memory for reuse instead of unmapping large blocks, which come back as fresh
    # pages to fault in every micro-batch (rlctl/memory.py); None: on when training on the CPU
    keep_freed_memory: bool | None = None


@dataclass
class DeepSpeedConfig:
    enabled: bool = False  # train under DeepSpeed ZeRO (any number of processes; launch several with accelerate launch)
    stage: int = 2  # ZeRO stage: 0 data parallel, 1 + optimiser state sharded, 2 + gradients, 3 + parameters
    offload_optimizer: bool = False  # keep optimiser state (and the update) on the CPU
    offload_params: bool = False  # ZeRO-3: keep parameters on the CPU between uses


@dataclass
class EvalConfig:
    enabled: bool = True  # evaluate before training, every `every` steps, and after
    every: int = 0  # steps between evaluations during training (0 = only before and after)
    n_samples: int = 1  # completions per held-out prompt
    temperature: float = 0.0  # 0 = greedy
    pass_k: list[int] = field(default_factory=lambda: [1])  # report pass@k for each k ≤ n_samples
    batch_size: int = 64  # prompts per generation call
    # a second reward scored on held-out answers only, never trained on (over-optimisation shows as the trained reward
    # rising while this one does not): a rule (exact_number, gsm8k, math_verify), reward_model, http or judge (set up
    # by the reward group's keys), or path/to/file.py:function; None = off
    gold: str | None = None
    # warn once when the best gold is this many evaluations old and each since scored a higher trained reward
    gold_patience: int = 2


@dataclass
class CheckpointConfig:
    every: int = 10  # save a resumable checkpoint every N steps, and always at the end (0 = only at the end)
    keep_last: int = 2  # resumable checkpoints kept; older ones are deleted once a newer one is complete
    max_consecutive_skips: int = 3  # stop after this many steps in a row whose update was skipped (non-finite)


@dataclass
class TrainCheckpointConfig(CheckpointConfig):
    # none | gold | reward: also keep the policy of the evaluation with the best held-out eval.gold (or trained) reward
    # as checkpoints/best, exported like final
    keep_best: str = "none"


@dataclass
class LoggerConfig:
    console: bool = True  # rich progress bar and periodic sample tables
    sample_every: int = 10  # steps between sample tables (0 = never)
    samples_shown: int = 3  # rows per sample table
    wandb: bool = False  # also log to Weights & Biases (honours WANDB_MODE, e.g. offline)
    wandb_project: str = "rlctl"  # W&B project
    wandb_entity: str | None = None  # W&B entity (team or user)


@dataclass
class TrainConfig:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)  # multi-turn: the environment the policy acts in
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: TrainCheckpointConfig = field(default_factory=TrainCheckpointConfig)
    resume: str = (
        "auto"  # auto (newest checkpoint in this run folder, if any) | never | PATH (a checkpoint or run folder)
    )
    steps: int = 24  # training steps (one step = rollout + update)
    prompts_per_step: int = 8  # prompts sampled per step and process (P); each trains on P × group_size samples
    save_final: bool = True  # write checkpoints/final (HF format) at the end
    dry_run: bool = False  # check the config, print the batch layout and exit, loading no model weights


@dataclass
class EvalCommandConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)  # multi-turn: the environment the policy acts in
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: str | None = None  # write the results as JSON here too


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)  # multi-turn: the environment the policy acts in
    engine: EngineConfig = field(default_factory=EngineConfig)
    prompts: list[str] = field(default_factory=list)  # prompts to complete; empty: take from the dataset
    num_prompts: int = 4  # dataset prompts to take when `prompts` is empty
    n: int = 1  # completions per prompt


@dataclass
class PreferenceDataConfig:
    source: str = "arithmetic"  # arithmetic (built-in pairs) | jsonl (rows with prompt, chosen, rejected[, margin])
    # jsonl: the pairs: a JSONL, JSON, CSV or Parquet file, a save_to_disk folder, or a hub id
    path: str | None = None
    eval_path: str | None = None  # held-out pairs; None: a split of `path` (arithmetic: the held-out problems)
    split: str = "train"  # a save_to_disk folder's or hub dataset's split to train on
    eval_split: str = "test"  # its split of held-out pairs, when eval_path names the same folder or id
    prompt_field: str = "prompt"  # row field of the prompt; a row without it: the beginning chosen and rejected share
    chosen_field: str = "chosen"  # row field of the preferred reply (or whole conversation)
    rejected_field: str = "rejected"  # row field of the other reply
    eval_fraction: float = 0.2  # share of rows (arithmetic: of problems) held out when there is no eval_path
    eval_size: int = 256  # held-out pairs used by evaluation (fewer if there are fewer)
    seed: int = 0  # seed of the split, the pair order and the built-in pairs
    digits: int = 1  # arithmetic: digits per operand
    num_operands: int = 2  # arithmetic: operands per problem
    operators: str = "+"  # arithmetic: operators to draw from, any of "+-*"
    pairs_per_problem: int = 8  # arithmetic: pairs made from each problem
    rambling_fraction: float = 0.5  # arithmetic: share of rejected replies that ramble, restate or give no number
    system_prompt: str | None = None  # system message prepended to every prompt
    max_tokens: int = 512  # pairs with a side (prompt + reply) longer than this are skipped


@dataclass
class RMEvalConfig:
    enabled: bool = True  # pairwise accuracy on held-out pairs before training, every `every` steps, and after
    every: int = 0  # steps between evaluations during training (0 = only before and after)
    batch_size: int = 32  # pairs per forward pass


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the causal LM the reward model starts from
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # micro_batch_size counts pairs; minibatch_size must be 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: RMEvalConfig = field(default_factory=RMEvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto (newest checkpoint in this run folder, if any) | never | PATH
    pairs_per_step: int = 16  # preference pairs per optimiser update, per process
    epochs: float = 2.0  # passes over the training pairs (when steps = 0)
    steps: int = 0  # optimiser updates; 0 = as many as `epochs` take
    margin: float = 0.0  # added to every pair's own margin: loss = −log σ(r_chosen − r_rejected − margin)
    # c of the added c·mean((r_chosen + r_rejected)²), keeping scores near 0 (TRL's); 0 = off
    center_rewards_coefficient: float = 0.0
    # scalar: a one-label head trained by Bradley-Terry (reward=model) | judge: the causal LM taught to answer "Yes" for
    # the chosen reply and "No" for the rejected one under judge_template (reward=judge)
    head: str = "scalar"
    # head=judge: how the judge is asked, as reward.judge.form: question (one user turn quoting the reply) | conversation
    # (the pair's chat, the reply as the assistant's turn, then judge_template as the next user turn)
    judge_form: str = "question"
    # head=judge: the question about one reply, with {prompt} (the last user message) and {completion}; None: the form's
    # default without a reference answer ("Question … Reply … Does the reply answer the question correctly? Answer Yes
    # or No." | "Is your answer correct? Answer Yes or No.")
    judge_template: str | None = None
    # head=judge: pairwise (Bradley-Terry on the verdict margins z_Yes − z_No of the chosen and the rejected question) |
    # yes_no (cross-entropy of "Yes" after the chosen question and "No" after the rejected one)
    judge_loss: str = "pairwise"
    save_final: bool = True  # write checkpoints/final (AutoModelForSequenceClassification format) at the end


@dataclass
class SFTDataConfig(DataConfig):
    completion_field: str = "completion"  # jsonl: the reply to train on, beside prompt_field
    messages_field: str = "messages"  # jsonl: chat messages to train on (every assistant turn); used when a row has it
    max_tokens: int = 1024  # demonstrations longer than this (prompt + reply, in tokens) are skipped
    pack: bool = False  # concatenate each micro-batch's demonstrations into rows of ≤ max_tokens (attention kept per demonstration)


@dataclass
class SFTEvalConfig:
    enabled: bool = True  # held-out loss (and accuracy, for rows with an answer) before, every `every` steps, after
    every: int = 0  # steps between evaluations during training (0 = only before and after)
    batch_size: int = 64  # demonstrations per forward pass, prompts per generate call
    max_new_tokens: int = 64  # greedy completion length for held-out accuracy


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the causal LM to fine-tune
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # the rules that judge held-out accuracy
    # micro_batch_size counts demonstrations; minibatch_size must be 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto (newest checkpoint in this run folder, if any) | never | PATH
    examples_per_step: int = 16  # demonstrations per optimiser update, per process
    epochs: float = 1.0  # passes over the demonstrations (when steps = 0)
    steps: int = 0  # optimiser updates; 0 = as many as `epochs` take
    save_final: bool = True  # write checkpoints/final (a causal LM, for rlctl train model.path=...)


@dataclass
class DPOEvalConfig:
    enabled: bool = True  # held-out preference accuracy (and task accuracy) before, every `every` steps, after
    every: int = 0  # steps between evaluations during training (0 = only before and after)
    batch_size: int = 32  # pairs per forward pass, prompts per generate call
    task_accuracy: bool = True  # arithmetic pairs: also held-out accuracy of greedy answers by the exact-number rule
    max_new_tokens: int = 16  # greedy completion length for task accuracy


@dataclass
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy; its initial weights are the reference
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # micro_batch_size counts pairs; minibatch_size must be 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto (newest checkpoint in this run folder, if any) | never | PATH
    pairs_per_step: int = 16  # preference pairs per optimiser update, per process
    epochs: float = 1.0  # passes over the training pairs (when steps = 0)
    steps: int = 0  # optimiser updates; 0 = as many as `epochs` take
    beta: float = 0.1  # β: strength of the pull towards the reference (sigmoid: reward scale; ipo: τ)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # sigmoid: chance a preference label is flipped (conservative DPO); 0 = plain DPO
    nll_coef: float = 0.0  # α: weight of the chosen replies' length-normalised NLL added to the loss (RPO); 0 = none
    # ipo: each reply's log-ratio divided by its token count (TRL's IPO); false = summed (the paper's)
    ipo_length_normalised: bool = False
    save_final: bool = True  # write checkpoints/final (a causal LM)


def fill(group: str, node: DictConfig | dict, *targets: type, **derived: Any):
    """Plain objects filled by field name from one config group: every field of every target is
    taken from the group's key of that name (or from ``derived``, values worked out from other
    groups), every key of the group must be taken by some target, and every derived value must be
    used. So a new setting cannot be silently dropped between the schema and the object that uses
    it. Returns one instance, or a tuple for several targets. A target's own ``ValueError`` becomes
    a one-line error naming ``group.key`` (its message starts with the key)."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    taken: set[str] = set()
    made = []
    for target in targets:
        names = [f.name for f in dataclasses.fields(target)]
        missing = [n for n in names if n not in values and n not in derived]
        if missing:
            raise TypeError(f"{target.__name__}: fields {missing} are neither keys of '{group}' nor derived")
        taken.update(names)
        try:
            made.append(target(**{n: derived[n] if n in derived else values[n] for n in names}))
        except ValueError as err:
            raise RlctlError(f"{group}.{err}") from None
    unread = sorted(set(values) - taken)
    unused = sorted(set(derived) - taken)
    if unread or unused:
        raise TypeError(f"'{group}' keys {unread} and derived values {unused} are read by none of {targets}")
    return made[0] if len(made) == 1 else tuple(made)


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of a composed config that its schema does not have, each with the keys it does have
    there. Hydra lets ``+key=value`` add a key past the schema; rlctl would then ignore it silently."""
    import typing

    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    found = []
    for key in node.keys():
        if key not in known:
            found.append((f"{prefix}{key}", known))
            continue
        kind, value = hints[key], node._get_node(key)
        args = typing.get_args(kind)
        element = args[0] if typing.get_origin(kind) is list and args else None
        if dataclasses.is_dataclass(kind) and isinstance(value, DictConfig):
            found += unknown_keys(value, kind, f"{prefix}{key}.")
        elif element is not None and dataclasses.is_dataclass(element) and value is not None:
            for item in value:
                if isinstance(item, DictConfig):
                    found += unknown_keys(item, element, f"{prefix}{key}.")
    return found


def check_known_keys(cfg: DictConfig, schema: type) -> None:
    """A one-line error for the first key outside the schema (e.g. ``+optim.lrr=1e-5``)."""
    unknown = unknown_keys(cfg, schema)
    if unknown:
        key, known = unknown[0]
        raise RlctlError(f"{key}: no such setting (known here: {', '.join(known)}); check the spelling")


SCHEMAS = {"train": TrainConfig, "eval": EvalCommandConfig, "generate": GenerateConfig, "rm": RMConfig,
           "sft": SFTConfig, "dpo": DPOConfig}  # fmt: skip


def native_bf16() -> bool:
    """Whether bf16 matmuls run in hardware here: a CUDA GPU that supports bf16, or a CPU with AMX or
    AVX512-BF16 (Linux's /proc/cpuinfo flags)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore; the primary configs name them first in their defaults.
    Also the resolver of engine.precision's default."""
    OmegaConf.register_new_resolver("rlctl_native_precision", lambda: "bf16" if native_bf16() else "no",
                                    replace=True, use_cache=True)  # fmt: skip
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalCommandConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    store.store(name="rm_schema", node=RMConfig)
    store.store(name="sft_schema", node=SFTConfig)
    store.store(name="dpo_schema", node=DPOConfig)
