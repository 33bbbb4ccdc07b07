"""Config -> stages. The only module that reads the config tree; everything it builds gets plain values."""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from rlctl import models
from rlctl.algos import Algorithm
from rlctl.algos.correction import MismatchCorrection
from rlctl.checkpoint import CheckpointPolicy, drop_metrics_after, read_trainer_state, resolve_resume
from rlctl.config import fill
from rlctl.data import PromptSampler, PromptSet, encode_prompts, load_examples
from rlctl.data.prompts import PromptFormat, conversation, render_messages, uses_chat_template
from rlctl.data.sources import SOURCES, SourceSpec
from rlctl.distributed import Ranks, init_process_group, launched_ranks
from rlctl.envs import EnvSpec, Task, checked_messages, environment_factory
from rlctl.errors import RlctlError, check_fields
from rlctl.evaluate import EvalSpec, Evaluator
from rlctl.logging import ConsoleSink, JsonlSink, LogFileSink, Loggers, LogSpec, WandbSink
from rlctl.lora import AdapterDisabled, LoraSpec, add_adapter, load_adapter
from rlctl.memory import apply_allocator_setting
from rlctl.optim.engine import (
    PRECISIONS,
    DeepSpeedEngine,
    Engine,
    FrozenPolicy,
    OptimSpec,
    ReplicaEngine,
    ZeroSpec,
    frozen_for_inference,
    make_accelerator,
)
from rlctl.optim.layout import BatchLayout
from rlctl.optim.trust_region import trust_region_update
from rlctl.optim.update import update
from rlctl.plan import checked_model_shape, plan_for
from rlctl.rewards import WeightedRewards
from rlctl.rewards.http import HttpReward, HttpRewardSpec
from rlctl.rewards.judge import JudgeReward, JudgeSpec
from rlctl.rewards.model import ModelReward, ModelRewardSpec, check_reward_model_config
from rlctl.rewards.rules import SCORERS, RewardSpec, Term, load_user_reward, resolve_rule
from rlctl.rollout import BACKENDS, HFRollout, SamplingParams
from rlctl.rollout.multiturn import EnvironmentRollout
from rlctl.rollout.vllm import VLLMSpec
from rlctl.stages import Stages


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_process(engine_cfg: DictConfig) -> None:
    """What the ``engine`` group sets for the whole training process: the seeds, and whether freed
    memory stays in the process for reuse (``rlctl.memory``)."""
    seed_everything(engine_cfg.seed)
    apply_allocator_setting(engine_cfg.keep_freed_memory, on_gpu=torch.cuda.is_available())


@dataclass(frozen=True)
class CriticSpec:
    """The ``critic`` config group, filled by field name."""

    path: str | None  # initial weights; None = the policy's model.path
    lr: float
    warmup_steps: int  # steps during which only the critic trains
    max_grad_norm: float
    lora: LoraSpec  # the critic's own adapter (critic.lora)

    def __post_init__(self) -> None:
        if not isinstance(self.lora, LoraSpec):  # the group's lora mapping
            try:
                object.__setattr__(self, "lora", LoraSpec(**{key: self.lora[key] for key in self.lora.keys()}))
            except ValueError as err:
                raise ValueError(f"lora.{err}") from None
        checks = (("lr", self.lr > 0 and math.isfinite(self.lr), "must be a positive number"),
                  ("warmup_steps", self.warmup_steps >= 0, "must be ≥ 0"),
                  ("max_grad_norm", self.max_grad_norm >= 0, "must be ≥ 0 (0 = no clipping)"))  # fmt: skip
        check_fields(self, checks)


@dataclass(frozen=True)
class TrainSettings:
    """The whole ``train`` config as the plain objects its consumers take, every value checked.
    Reading it loads nothing, so every mistake in the config is reported within seconds."""

    algo: Algorithm
    optim: OptimSpec
    critic: CriticSpec
    zero: ZeroSpec
    sampling: SamplingParams
    vllm: VLLMSpec
    correction: MismatchCorrection
    source: SourceSpec
    prompt_format: PromptFormat
    eval: EvalSpec
    log: LogSpec
    checkpoints: CheckpointPolicy
    layout: BatchLayout
    ranks: Ranks
    lora: LoraSpec
    env: EnvSpec  # multi-turn: the environment (env=none: one reply per prompt)


def env_settings(env: DictConfig, sampling: SamplingParams) -> tuple[EnvSpec, int]:
    """The ``env`` group, checked (a user's class loads and has reset/step), and the most tokens a
    response may hold: ``rollout.max_new_tokens``, or a whole trajectory's replies and observations."""
    spec = fill("env", env, EnvSpec)
    environment_factory(spec)
    return spec, spec.total_tokens(sampling.max_new_tokens) if spec.enabled else sampling.max_new_tokens


def read_train_settings(cfg: DictConfig, ranks: Ranks | None = None) -> TrainSettings:
    """Every group of the config, filled by field name into the object that uses it (``config.fill``)
    and checked; the batch layout derived. One-line errors name the key; nothing is loaded."""
    ranks = ranks or launched_ranks()
    for key, value in (("steps", cfg.steps), ("prompts_per_step", cfg.prompts_per_step)):
        if value < 1:
            raise RlctlError(f"{key}: must be ≥ 1, got {value}")
    reward_settings(cfg.reward)
    check_precision(cfg.engine.precision)
    sampling, vllm, correction = rollout_settings(cfg.rollout)
    env, response_tokens = env_settings(cfg.env, sampling)
    algo = fill("algo", cfg.algo, Algorithm, max_new_tokens=response_tokens)
    critic = fill("critic", cfg.critic, CriticSpec)
    source, prompt_format = fill("data", cfg.data, SourceSpec, PromptFormat)
    if source.source not in SOURCES:
        raise RlctlError(f"data.source: unknown source {source.source!r}; known: {sorted(SOURCES)}")
    if prompt_format.overlong not in ("skip", "truncate"):
        raise RlctlError(f"data.overlong: must be 'skip' or 'truncate', got {prompt_format.overlong!r}")
    optim = fill("optim", cfg.optim, OptimSpec, total_updates=1)
    layout = BatchLayout.derive(
        prompts_per_step=cfg.prompts_per_step, group_size=algo.group_size, world_size=ranks.world_size,
        minibatch_size=optim.minibatch_size, micro_batch_size=optim.micro_batch_size,
        num_iterations=algo.num_iterations, max_prompt_tokens=prompt_format.max_prompt_tokens,
        max_new_tokens=response_tokens, fixed_accumulation=cfg.deepspeed.enabled,
        max_tokens_per_micro_batch=optim.max_tokens_per_micro_batch, share_prompts=optim.share_prompts,
    )  # fmt: skip
    zero = fill("deepspeed", cfg.deepspeed, ZeroSpec, precision=cfg.engine.precision, world_size=ranks.world_size,
                micro_batch_size=layout.micro_batch_size, accumulation_steps=layout.accumulation_steps)  # fmt: skip
    if ranks.world_size > 1 and not zero.enabled:
        raise RlctlError(
            f"deepspeed: this launch has {ranks.world_size} processes; several processes train under DeepSpeed, "
            "so pick a stage (deepspeed=zero2, zero3, ...)"
        )
    if algo.trust_region and zero.enabled and zero.stage > 1:
        raise RlctlError(
            f"deepspeed: the trust-region step (algo=trpo) needs the whole parameters and gradient on every rank: it "
            f"runs under deepspeed=none (one process), zero0 or zero1 (several), not ZeRO stage {zero.stage}, which "
            "partitions them"
        )
    if algo.trust_region and cfg.engine.precision == "fp16":
        raise RlctlError("engine.precision: the trust-region step (algo=trpo) runs in fp32 (no) or bf16, not fp16")
    check_gold(cfg)
    models.check_path(cfg.model.path, "model.path")
    if algo.needs_values and critic.path is not None:
        models.check_path(critic.path, "critic.path")
    return TrainSettings(
        algo=algo, optim=replace(optim, total_updates=cfg.steps * layout.updates_per_step), critic=critic,
        zero=zero, sampling=sampling, vllm=vllm, correction=correction, source=source, prompt_format=prompt_format,
        eval=fill("eval", cfg.eval, EvalSpec), log=fill("logger", cfg.logger, LogSpec),
        checkpoints=fill("checkpoint", cfg.checkpoint, CheckpointPolicy, KeepBest)[0], layout=layout, ranks=ranks,
        lora=fill("model.lora", cfg.model.lora, LoraSpec), env=env,
    )  # fmt: skip


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise RlctlError(f"engine.precision: must be one of {' | '.join(PRECISIONS)}, got {precision!r}")


def config_warnings(cfg: DictConfig, training: bool) -> list[str]:
    """Settings that run but give numbers without meaning: one line each, printed before anything runs."""
    found = []
    if cfg.eval.n_samples > 1 and cfg.eval.temperature == 0:
        found.append(
            f"eval.n_samples={cfg.eval.n_samples} at eval.temperature=0: greedy decoding gives the same completion "
            "every time, so pass@k equals pass@1; set eval.temperature (e.g. 1.0)"
        )
    trained = {t.name: t.weight for t in reward_settings(cfg.reward)[0].term_list()}
    if cfg.eval.gold is not None and trained.get(cfg.eval.gold, 0) != 0:
        found.append(
            f"eval.gold={cfg.eval.gold} is a term of the trained reward itself (weight {trained[cfg.eval.gold]:g}): "
            "the gold curve would only repeat the trained one; pick a reward the policy is not trained on"
        )
    if training and cfg.rollout.temperature == 0 and cfg.algo.group_size > 1:
        found.append(
            f"rollout.temperature=0: the {cfg.algo.group_size} completions of a prompt are the same greedy one, so "
            "their rewards are equal, group advantages are 0 and little or nothing is learned; use rollout.temperature=1.0"
        )
    return found


def policy_update_of(algo: Algorithm, temperature: float):
    """How the policy learns from a minibatch: an optimiser update, or TRPO's trust-region step."""
    if not algo.trust_region:
        return update
    return partial(trust_region_update, spec=algo.trust_region_spec(), fisher_fraction=algo.fisher_fraction,
                   temperature=temperature)  # fmt: skip


def data_warnings(layout: BatchLayout, train_prompts: int) -> list[str]:
    """What the data makes of the batch layout: a step that asks for more prompts than there are."""
    asked = layout.prompts_per_step * layout.world_size
    if asked > train_prompts:
        return [f"prompts_per_step={layout.prompts_per_step} × {layout.world_size} process(es) = {asked} prompts a step, but "
                f"there are {train_prompts} training prompts: every step repeats prompts (lower prompts_per_step, or "
                "add data)"]  # fmt: skip
    return []


KEEP_BEST = ("none", "gold", "reward")


@dataclass(frozen=True)
class KeepBest:
    keep_best: str  # none | gold | reward (checked by check_gold)


@dataclass(frozen=True)
class JudgeGroup:
    judge: dict  # the reward.judge group, filled into JudgeSpec on its own


def reward_settings(reward: DictConfig) -> tuple[RewardSpec, ModelRewardSpec, HttpRewardSpec, JudgeSpec]:
    """The ``reward`` group as its consumers: the weighted terms, the reward model, the server, the judge.
    A scorer's term without its key (reward_model without reward.model_path) is refused here."""
    rules, model, http, group = fill("reward", reward, RewardSpec, ModelRewardSpec, HttpRewardSpec, JudgeGroup)
    judge = fill("reward.judge", group.judge, JudgeSpec)
    if rules.fn is not None and ".py:" not in rules.fn:
        raise RlctlError(f"reward.fn: expected 'path/to/file.py:function', got {rules.fn!r}")
    names = {term.name for term in rules.term_list()}
    for name, key, value in (("reward_model", "reward.model_path", model.model_path), ("http", "reward.url", http.url)):
        if name in names and not value:
            raise RlctlError(f"{key}: the {name} term needs it (reward.terms names {name!r}); set {key}=...")
    if "reward_model" in names:
        for index, path in enumerate(model.paths):
            check_reward_model_config(path, model.key_of(index))
    if "http" in names:
        HttpReward(http)  # checks the URL and that the header variables are set
    return rules, model, http, judge


def check_reward_functions(reward: DictConfig) -> None:
    """The dry run's check of your functions (reward.fn, reward.accuracy): each file loads and its
    function takes what it must; the real run loads them once, when it builds the reward stage."""
    rules = reward_settings(reward)[0]
    for term in rules.term_list():
        if ".py:" in term.name:
            load_user_reward(term.name)
    rules.accuracy_rule()


def make_scorers(cfg: DictConfig, names: set[str], zero: ZeroSpec | None, autocast, have: dict | None = None) -> dict:
    """The batch scorers (a reward model, a server, a judge) that ``names`` ask for, from the reward
    group's keys; those in ``have`` (already built for another reward) are shared, not loaded twice."""
    _, model_spec, http_spec, judge_spec = reward_settings(cfg.reward)
    have = have or {}
    makers = {
        "reward_model": lambda: ModelReward(model_spec, cfg.model.dtype, cfg.model.trust_remote_code, zero, autocast),
        "http": lambda: HttpReward(http_spec),
        "judge": lambda: JudgeReward(judge_spec, cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code, zero,
                                     autocast),
    }  # fmt: skip
    return {name: have[name] if name in have else make() for name, make in makers.items() if name in names}


def build_rewards(cfg: DictConfig, zero: ZeroSpec | None = None, autocast=None) -> WeightedRewards:
    """The reward stage: rule terms, and the scorers the terms name (a reward model, a server)."""
    rules = reward_settings(cfg.reward)[0]
    terms = rules.term_list()
    scorers = make_scorers(cfg, {term.name for term in terms}, zero, autocast)
    accuracy_rule, meaning = rules.accuracy_rule(cfg.data.answer_format)
    return WeightedRewards(terms, rules.accuracy_term, rules.timeout_s, rules.fallback, rules.on_error, scorers,
                           accuracy_rule, meaning)  # fmt: skip


def check_gold(cfg: DictConfig) -> None:
    """``eval.gold`` names a reward the reward stage can build (before any model loads), and
    ``checkpoint.keep_best`` has what it ranks by; one line naming the key otherwise."""
    gold = cfg.eval.gold
    if gold is not None:
        if gold in SCORERS:
            key = {"reward_model": ("reward.model_path", cfg.reward.model_path), "http": ("reward.url", cfg.reward.url)}
            needed = key.get(gold)
            if needed is not None and not needed[1]:
                raise RlctlError(f"eval.gold: {gold} is scored with {needed[0]}, which is not set; set {needed[0]}=...")
        else:
            try:
                resolve_rule(gold)
            except RlctlError as err:
                raise RlctlError(f"eval.gold: {str(err).split(': ', 1)[1]}") from None
    keep_best = cfg.checkpoint.keep_best
    if keep_best not in KEEP_BEST:
        raise RlctlError(f"checkpoint.keep_best: must be one of {list(KEEP_BEST)}, got {keep_best!r}")
    if keep_best != "none" and not cfg.eval.enabled:
        raise RlctlError(f"checkpoint.keep_best={keep_best}: the best is picked by held-out evaluation, which "
                         "eval.enabled=false turns off")  # fmt: skip
    if keep_best == "gold" and gold is None:
        raise RlctlError("checkpoint.keep_best=gold: there is no gold reward; name one with eval.gold (e.g. "
                         "eval.gold=exact_number), or keep the best by the trained reward: checkpoint.keep_best=reward")  # fmt: skip


def build_gold(cfg: DictConfig, rewards: WeightedRewards, zero: ZeroSpec | None = None, autocast=None):
    """``eval.gold`` as a one-term reward (its scorer shared with the trained reward's when both use it), or None."""
    name = cfg.eval.gold
    if name is None:
        return None
    rules = reward_settings(cfg.reward)[0]
    have = {term.name: fn for term, fn in zip(rewards.terms, rewards.functions) if term.name in SCORERS}
    scorers = make_scorers(cfg, {name}, zero, autocast, have)
    return WeightedRewards([Term(name, 1.0, {})], 0, rules.timeout_s, rules.fallback, "fallback", scorers)


# Reward terms that never read the reference answer: prompt-only data is enough for them.
ANSWER_FREE_TERMS = ("format", "reward_model", "http")


def read_examples(cfg: DictConfig, reward: DictConfig | None = None):
    """(training, held-out) examples of the ``data`` group. Rows without an answer are accepted when
    no reward term of ``reward`` (the reward group; None: nothing scores them) reads one (a reward model,
    a server, a format rule); else one line names the row."""
    source = fill("data", cfg.data, SourceSpec, PromptFormat)[0]
    train, held_out = load_examples(source.source, source)  # held-out cut to data.eval_size
    unanswered = next((e for e in [*train, *held_out] if e.answer is None), None)
    if unanswered is not None:
        terms = reward_settings(reward)[0].term_list() if reward is not None else []
        readers = sorted({t.name for t in terms} - set(ANSWER_FREE_TERMS))
        if readers:
            raise RlctlError(
                f"data: row {unanswered.origin} has no field {source.answer_field!r}, and the reward terms {readers} "
                "compare with a reference answer; prompt-only data needs a reward that reads none (reward=model, "
                "reward=http), or set data.answer_field"
            )
        train, held_out = ([replace(e, answer="") for e in part] for part in (train, held_out))
    return train, held_out


def build_prompts(cfg: DictConfig, tokenizer, reward: DictConfig | None = None) -> tuple[PromptSet, PromptSet]:
    prompt_format = fill("data", cfg.data, SourceSpec, PromptFormat)[1]
    train, held_out = read_examples(cfg, reward)
    return encode_prompts(train, prompt_format, tokenizer), encode_prompts(held_out, prompt_format, tokenizer)


def rollout_settings(
    rollout: DictConfig, training: bool = True, **changes
) -> tuple[SamplingParams, VLLMSpec, MismatchCorrection]:
    """The ``rollout`` group as its three consumers: sampling, the vLLM engine, the mismatch correction.
    Outside training (eval, generate) nothing is corrected, so the correction's keys are not checked."""
    if rollout.backend not in BACKENDS:
        raise RlctlError(f"rollout.backend: unknown backend {rollout.backend!r}; known: {list(BACKENDS)}")
    sampling, vllm, correction = fill("rollout", rollout, SamplingParams, VLLMSpec, MismatchCorrection)
    if correction.is_correction != "none" and sampling.backend == "hf" and training:
        raise RlctlError(
            f"rollout.is_correction={correction.is_correction}: the hf backend samples with the training model itself "
            "and returns no sampling log-probs to correct against; use rollout.is_correction=none, or rollout=vllm"
        )
    if sampling.backend == "vllm":
        from rlctl.rollout.vllm import check_installed

        check_installed()
    return replace(sampling, **changes), vllm, correction


class EngineFolder(NamedTuple):
    """What a vLLM engine loads at start, and whether it is a copy to delete once the engine runs."""

    path: str
    temporary: bool


def rollout_model_folder(model_path: str, model: torch.nn.Module) -> EngineFolder:
    """The policy's own folder or hub id; for a model with no folder (``random:tiny``) a temporary
    copy of its initial weights. The engine receives the policy's weights before its first rollout
    in any case."""
    if not model_path.startswith(models.RANDOM_PREFIX):
        return EngineFolder(models.resolve(model_path), temporary=False)
    folder = tempfile.mkdtemp(prefix="rlctl-rollout-")
    model.save_pretrained(folder, safe_serialization=True)
    return EngineFolder(folder, temporary=True)


def rollout_sequences(cfg: DictConfig) -> int:
    """The most sequences one generation call of this command asks for: a training step's samples
    (per process), an evaluation batch, or ``rlctl generate``'s prompts × n."""

    def select(key: str):
        return OmegaConf.select(cfg, key, default=None)

    counts = [
        (select("prompts_per_step") or 0) * (select("algo.group_size") or 1),
        (select("eval.batch_size") or 0) * (select("eval.n_samples") or 1)
        if select("eval.enabled") is not False
        else 0,
        max(len(select("prompts") or []), select("num_prompts") or 0) * (select("n") or 1),
    ]
    return max(1, *counts)


def build_rollout(
    cfg: DictConfig, sampling: SamplingParams, vllm: VLLMSpec, tokenizer, autocast, model_folder: EngineFolder | None,
    first: Task | None = None,
):  # fmt: skip
    """The rollout backend: ``hf`` generates with the policy's model; ``vllm`` starts its engine here.
    With an environment (``env``), the backend is driven turn by turn (``EnvironmentRollout``); its
    first messages are tried on ``first`` (None: the data's first training prompt, read here)."""
    env, response_tokens = env_settings(cfg.env, sampling)
    make_env = environment_factory(env)
    env_prompt_tokens = (
        environment_prompt_tokens(make_env, tokenizer, cfg.data.chat_template, sampling, first or first_task(cfg))
        if make_env
        else 0
    )
    if sampling.backend == "hf":
        backend = HFRollout(tokenizer, sampling, autocast)
    else:
        from rlctl.rollout.vllm import VLLMEngine, VLLMRollout

        try:
            engine = VLLMEngine(
                model_folder.path, vllm, cfg.engine.precision,
                max_model_len=cfg.data.max_prompt_tokens + env_prompt_tokens + response_tokens,
                seed=cfg.engine.seed + launched_ranks().rank, max_sequences=rollout_sequences(cfg),
            )  # fmt: skip
        finally:
            if model_folder.temporary:
                shutil.rmtree(model_folder.path, ignore_errors=True)
        backend = VLLMRollout(tokenizer, sampling, engine)
    if make_env is None:
        return backend
    return EnvironmentRollout(backend, tokenizer, make_env, env, cfg.data.chat_template)


def task_of(example, prompt_format: PromptFormat) -> Task:
    """A data example as an environment's task: its conversation, its answer, where it came from."""
    return Task(conversation(example, prompt_format), example.answer or "", example.origin)


def first_task(cfg: DictConfig) -> Task:
    """The first training prompt as an environment's task (what ``environment_prompt_tokens`` tries)."""
    return task_of(read_examples(cfg)[0][0], fill("data", cfg.data, SourceSpec, PromptFormat)[1])


def environment_prompt_tokens(make_env, tokenizer, chat_template: bool, sampling: SamplingParams, task: Task) -> int:
    """How long the environment's first messages for ``task`` are as a prompt, in tokens (a tool
    environment adds its tools' descriptions); a one-line error when ``reset`` raises or returns no
    messages, and for a tool environment when ``rollout.max_new_tokens`` cannot hold its shortest call."""
    env = make_env()
    where = f"env: {type(env).__name__}.reset"
    try:
        first = checked_messages(env.reset(task), where)
    except RlctlError:
        raise
    except Exception as err:  # the user's environment may raise anything
        raise RlctlError(f"{where} raised {type(err).__name__} on the first prompt ({task.origin}): {err}") from None
    text, has_special = render_messages(first, uses_chat_template(chat_template, tokenizer), tokenizer)
    shortest = getattr(env, "shortest_call", None)
    if shortest is not None:
        needed = len(tokenizer(shortest(), add_special_tokens=False)["input_ids"]) + 1  # and the end-of-turn token
        if sampling.max_new_tokens < needed:
            raise RlctlError(f"rollout.max_new_tokens={sampling.max_new_tokens}: too small for one tool call of "
                             f"{type(env).__name__} ({needed} tokens: {shortest()}); raise it to 64 or more")  # fmt: skip
    return len(tokenizer(text, add_special_tokens=not has_special)["input_ids"])


def build_evaluator(
    cfg: DictConfig, held_out: PromptSet, rewards, rollout, zero=None, autocast=None
) -> Evaluator | None:
    """The held-out evaluation, sampling through ``rollout``'s backend (its engine shared) with eval's
    settings, scored by the trained reward and the gold one (eval.gold)."""
    spec = fill("eval", cfg.eval, EvalSpec)
    if not spec.enabled or len(held_out) == 0:
        return None
    params = replace(rollout.params, temperature=spec.temperature, batch_size=spec.batch_size)
    return Evaluator(held_out, rollout.with_params(params), rewards, spec.n_samples, list(spec.pass_k),
                     build_gold(cfg, rewards, zero, autocast))  # fmt: skip


def build_inference(cfg: DictConfig):
    """``rlctl eval`` / ``generate``: (policy, tokenizer, rollout) for model.path. With vllm the engine
    loads the weights from the folder itself, so the model is not loaded a second time for it."""
    sampling, vllm, _ = rollout_settings(cfg.rollout, training=False)
    m = cfg.model
    if sampling.backend == "hf" or m.path.startswith(models.RANDOM_PREFIX):
        model, tokenizer = load_model_and_tokenizer(cfg)
    else:
        model, tokenizer = None, models.load_tokenizer(m.path, m.trust_remote_code)
    policy = FrozenPolicy(model)
    folder = rollout_model_folder(m.path, model) if sampling.backend == "vllm" else None
    rollout = build_rollout(cfg, sampling, vllm, tokenizer, make_accelerator(cfg.engine.precision).autocast, folder)
    if sampling.backend == "vllm":
        backend = rollout.backend if isinstance(rollout, EnvironmentRollout) else rollout
        backend.engine.holds_weights_of(policy)  # loaded from the same folder
    return policy, tokenizer, rollout


def load_model_and_tokenizer(cfg: DictConfig, weights_from: str | None = None, lora: LoraSpec | None = None):
    """The policy (from ``weights_from`` when resuming, else model.path) and its tokenizer. With
    LoRA, the base model always comes from model.path and ``weights_from`` holds the adapter."""
    m = cfg.model
    tokenizer = models.load_tokenizer(m.path, m.trust_remote_code)
    adapted = lora is not None and lora.enabled
    model = models.load_causal_lm(m.path if adapted else weights_from or m.path, tokenizer, m.dtype,
                                  m.trust_remote_code, seed=cfg.engine.seed)  # fmt: skip
    return model, tokenizer


def with_critic_adapter(critic: models.ValueModel, lora: LoraSpec, weights_from: str | None) -> models.ValueModel:
    """The critic as it trains: its backbone with a LoRA adapter (new, or the checkpoint's, with the
    checkpoint's value head); the value head itself always trains whole."""
    if not lora.enabled:
        return critic
    if weights_from:
        from safetensors.torch import load_file

        critic.backbone = load_adapter(critic.backbone, Path(weights_from))
        critic.head.load_state_dict(load_file(str(Path(weights_from) / "value_head.safetensors")))
    else:
        critic.backbone = add_adapter(critic.backbone, lora, task_type=None)
    return critic


def with_adapter(model, lora: LoraSpec, weights_from: str | None):
    """The policy as it trains: ``model`` itself, or ``model`` with a LoRA adapter (new, or the checkpoint's)."""
    if not lora.enabled:
        return model
    return load_adapter(model, Path(weights_from)) if weights_from else add_adapter(model, lora)


# Settings a resumed run may change; every other key defines the run and must stay as it was.
RESUMABLE_CHANGES = ("steps", "resume", "dry_run", "save_final", "logger.", "eval.every", "eval.batch_size",
                     "checkpoint.", "reward.timeout_s", "reward.on_error", "reward.max_failed_steps",
                     # where the reward server is and how it is reached, not what it scores
                     "reward.url", "reward.headers", "reward.retries", "reward.model_batch_size",
                     # the vLLM engine's resources, not what it samples
                     "rollout.gpu_memory_utilization", "rollout.kv_cache_gib", "rollout.enforce_eager",
                     "rollout.sleep_during_update", "rollout.tensor_parallel_size")  # fmt: skip


def flat_config(cfg: DictConfig) -> dict:
    """{"optim.lr": 2e-05, ...}: the resolved config as dotted keys (lists kept whole)."""

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(OmegaConf.to_container(cfg, resolve=True), ""))


def check_resumable(checkpoint: Path, config: dict | None, needs_critic: bool, world_size: int) -> dict:
    """A checkpoint resumes only the run it came from: the same settings but those in
    RESUMABLE_CHANGES, a critic iff the algorithm has one, the same number of processes.
    Returns the checkpoint's trainer state."""
    saved = read_trainer_state(checkpoint)
    if saved["world_size"] != world_size:
        raise RlctlError(
            f"resume: {checkpoint} was written by {saved['world_size']} processes; resume it with the same number "
            f"(this launch has {world_size})"
        )
    if saved["has_critic"] != needs_critic:
        raise RlctlError(
            f"resume: {checkpoint} {'has' if saved['has_critic'] else 'has no'} critic but this algorithm "
            f"{'needs' if needs_critic else 'does not use'} one; resume with the algorithm it was trained with"
        )
    if config is None:
        return saved
    before = saved["config"]
    changed = [
        k for k in set(before) | set(config) if not k.startswith(RESUMABLE_CHANGES) and before.get(k) != config.get(k)
    ]
    if changed:
        first = ("model.path", "data.source", "data.path", "data.eval_path", "reward.fn", "reward.terms", "algo.name")
        changed.sort(key=lambda k: (first.index(k) if k in first else len(first), k))  # what defines the run first
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {config.get(k)!r})" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise RlctlError(
            f"resume: {checkpoint} was trained with other settings: {shown}{more}; a resumed run keeps what defines "
            f"it (only steps, logger.*, eval.every, checkpoint.*, ... may change): pass the old values, or start a "
            "new run in a new folder"
        )
    return saved


def refuse_a_second_run_in(run_dir: Path) -> None:
    """A run folder holds one run: starting afresh where a run trained would mix two histories. The
    metrics of a start that never reached its first step are replaced."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    from rlctl.report import STEP_KEYS

    if any(f'"{key}"' in metrics.read_text(encoding="utf-8") for key in STEP_KEYS):
        raise RlctlError(
            f"resume: {run_dir} already holds a run that trained (metrics.jsonl), and this start would not continue "
            "it (resume=never, or no checkpoint yet); start this run in a new folder (hydra.run.dir=...)"
        )
    metrics.unlink()


def build_train(cfg: DictConfig, run_dir: Path, resume_command: str = "rlctl train resume=RUN_DIR") -> Stages:
    """Everything the loop needs, in the order a failure is cheapest: every config check, data, then models."""
    settings = read_train_settings(cfg)
    algo, layout, ranks, zero = settings.algo, settings.layout, settings.ranks, settings.zero
    prepare_process(cfg.engine)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = resolve_resume(cfg.resume, run_dir)
    config = flat_config(cfg) if isinstance(cfg, DictConfig) else None  # what the checkpoints record
    if resume_from is None:
        if ranks.is_main:  # the main rank writes metrics.jsonl: another rank could see the new one
            refuse_a_second_run_in(run_dir)
    else:
        saved = check_resumable(resume_from, config, algo.needs_values, ranks.world_size)
        if ranks.is_main:
            drop_metrics_after(run_dir / "metrics.jsonl", saved["step"])
    examples = read_examples(cfg, cfg.reward)  # data errors come before any model loads
    if settings.env.enabled:  # the environment starts, and a tool call fits in a reply, before any model loads
        tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        first_prompt = task_of(examples[0][0], settings.prompt_format)
        environment_prompt_tokens(environment_factory(settings.env), tokenizer, cfg.data.chat_template,
                                  settings.sampling, first_prompt)  # fmt: skip
    shape = checked_model_shape(cfg, settings)  # from the model's config alone, before any weights load
    memory_plan = plan_for(cfg, settings, shape, rollout_sequences(cfg)) if ranks.is_main else ""
    policy_from = str(resume_from / "policy") if resume_from else None
    model, tokenizer = load_model_and_tokenizer(cfg, policy_from, settings.lora)
    rollout_folder = (  # before ZeRO-3 partitions the weights; an adapter's merged weights come at the first sync
        rollout_model_folder(policy_from if policy_from and not settings.lora.enabled else cfg.model.path, model)
        if settings.sampling.backend == "vllm"
        else None
    )
    model = with_adapter(model, settings.lora, policy_from)
    train_prompts, held_out = (encode_prompts(part, settings.prompt_format, tokenizer) for part in examples)
    if len(train_prompts) == 0:
        raise RlctlError(
            f"data: every training prompt is longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens}"
        )
    if cfg.model.gradient_checkpointing:
        models.checkpoint_activations(model)

    if zero.enabled:
        init_process_group(ranks, even_alone=True)

        def make_engine(module, spec):
            return DeepSpeedEngine(module, spec, zero)
    else:
        accelerator = make_accelerator(cfg.engine.precision)

        def make_engine(module, spec):
            return Engine(accelerator, module, spec)

    if ranks.world_size > 1:
        seed_everything(cfg.engine.seed + ranks.rank)  # same weights everywhere, different samples per rank
    if algo.trust_region:  # no optimiser: a replica per rank, the step summed over ranks (optim/trust_region.py)
        policy = ReplicaEngine(model, cfg.engine.precision, ranks.world_size, ranks.rank, ranks.local_rank)
    else:
        policy = make_engine(model, settings.optim)
    critic = None
    if algo.needs_values:
        c = settings.critic
        critic_from = str(resume_from / "critic") if resume_from else None
        critic_model = models.load_value_model(
            critic_from if critic_from and not c.lora.enabled else c.path or cfg.model.path,
            tokenizer,
            cfg.model.dtype,
            cfg.model.trust_remote_code,
            seed=cfg.engine.seed,
        )
        critic_model = with_critic_adapter(critic_model, c.lora, critic_from)
        if cfg.model.gradient_checkpointing:
            models.checkpoint_activations(critic_model)
        critic = make_engine(critic_model, replace(settings.optim, lr=c.lr, max_grad_norm=c.max_grad_norm))
    rewards = build_rewards(cfg, zero if zero.enabled else None, policy.autocast)
    reference = None
    if algo.needs_reference and settings.lora.enabled:  # the base weights, without a second copy
        reference = AdapterDisabled(policy.unwrapped())
    elif algo.needs_reference:
        reference = models.load_causal_lm(
            cfg.model.path, tokenizer, cfg.model.dtype, cfg.model.trust_remote_code, seed=cfg.engine.seed
        )
        reference = frozen_for_inference(reference, zero if zero.enabled else None)

    log = settings.log
    sinks = (
        [JsonlSink(run_dir / "metrics.jsonl"), LogFileSink(run_dir / "train.log", cfg.steps)] if ranks.is_main else []
    )  # one rank writes
    if log.console and ranks.is_main:
        sinks.insert(0, ConsoleSink(cfg.steps))
    if log.wandb and ranks.is_main:
        sinks.append(WandbSink(log.wandb_project, log.wandb_entity, run_dir, OmegaConf.to_container(cfg)))
    logger = Loggers(sinks)
    for name, prompts in (("training", train_prompts), ("held-out", held_out)):
        if prompts.skipped or prompts.truncated:
            logger.message(
                f"[yellow]data: {prompts.skipped} {name} prompts skipped and {prompts.truncated} truncated "
                f"(longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens}, data.overlong={cfg.data.overlong})"
            )
    for warning in [*config_warnings(cfg, training=True), *data_warnings(layout, len(train_prompts))]:
        logger.message(f"[yellow]warning: {escape(warning)}")
    if resume_from is None:  # logged once per run
        logger.metrics({"data/train_prompts": len(train_prompts), "data/eval_prompts": len(held_out),
                        "data/prompts_skipped": train_prompts.skipped + held_out.skipped,
                        "data/prompts_truncated": train_prompts.truncated + held_out.truncated}, 0)  # fmt: skip

    rollout = build_rollout(cfg, settings.sampling, settings.vllm, tokenizer, policy.autocast, rollout_folder,
                            first_prompt if settings.env.enabled else None)  # fmt: skip
    return Stages(
        tokenizer=tokenizer, policy=policy, critic=critic, reference=reference, rollout=rollout, rewards=rewards,
        algo=algo, layout=layout, sampling=settings.sampling, correction=settings.correction,
        train_prompts=train_prompts,
        sampler=PromptSampler(len(train_prompts), layout.prompts_per_step * ranks.world_size, cfg.data.seed),
        evaluator=build_evaluator(cfg, held_out, rewards, rollout, zero if zero.enabled else None, policy.autocast),
        logger=logger, keep_best=cfg.checkpoint.keep_best, gold_patience=settings.eval.gold_patience,
        checkpoints=settings.checkpoints, run_dir=run_dir, steps=cfg.steps, save_final=cfg.save_final,
        critic_warmup_steps=settings.critic.warmup_steps, max_failed_reward_steps=cfg.reward.max_failed_steps,
        eval_every=settings.eval.every,
        sample_every=log.sample_every, samples_shown=log.samples_shown, ranks=ranks,
        resume_from=resume_from, resume_command=resume_command, config=config or {},
        policy_update=policy_update_of(algo, settings.sampling.temperature), memory_plan=memory_plan,
        env_description=settings.env.describe(settings.sampling.max_new_tokens),
    )  # fmt: skip
