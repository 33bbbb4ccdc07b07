"""Config -> stages. The only module that reads the config tree; everything it builds gets plain values."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlctl import models
from rlctl.algos import Algorithm
from rlctl.checkpoint import resolve_resume
from rlctl.data import PromptSampler, PromptSet, encode_prompts, load_examples
from rlctl.data.prompts import PromptFormat
from rlctl.data.sources import SourceSpec
from rlctl.distributed import init_process_group, launched_ranks
from rlctl.engine import DeepSpeedEngine, Engine, OptimSpec, ZeroSpec, frozen_for_inference, make_accelerator
from rlctl.errors import RlctlError
from rlctl.evaluate import Evaluator
from rlctl.logging import ConsoleSink, JsonlSink, Loggers, WandbSink
from rlctl.rewards import WeightedRewards
from rlctl.rewards.rules import Term
from rlctl.rollout import BACKENDS, SamplingParams
from rlctl.trainer import Schedule, Stages


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_algorithm(cfg: DictConfig) -> Algorithm:
    a = cfg.algo
    try:
        return Algorithm(
            advantage=a.advantage, policy_loss=a.policy_loss, group_size=a.group_size, scale_by_std=a.scale_by_std,
            std_eps=a.std_eps, clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip, loss_agg=a.loss_agg,
            norm_length=cfg.rollout.max_new_tokens if a.norm_by_max_new_tokens else None,
            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, kl_placement=a.kl_placement, kl_target=a.kl_target,
            kl_horizon=a.kl_horizon, entropy_coef=a.entropy_coef, gamma=a.gamma, lam=a.lam, value_loss=a.value_loss,
            value_clip=a.value_clip, vf_coef=a.vf_coef, overlong_buffer=a.overlong_buffer,
            overlong_penalty=a.overlong_penalty, dynamic_sampling=a.dynamic_sampling,
        )  # fmt: skip
    except KeyError as err:
        raise RlctlError(f"algo: {err.args[0]}") from None
    except ValueError as err:
        raise RlctlError(f"algo: {err}") from None


def build_rewards(cfg: DictConfig) -> WeightedRewards:
    r = cfg.reward
    if r.fn:
        terms = [Term(r.fn, 1.0, {})]
    else:
        terms = [Term(t.name, t.weight, {"pattern": t.pattern} if t.pattern is not None else {}) for t in r.terms]
    return WeightedRewards(terms, r.accuracy_term, r.timeout_s, r.fallback, r.on_error)


def build_prompts(cfg: DictConfig, tokenizer) -> tuple[PromptSet, PromptSet]:
    d = cfg.data
    spec = SourceSpec(
        path=d.path, subset=d.subset, split=d.split, eval_path=d.eval_path, eval_split=d.eval_split,
        prompt_field=d.prompt_field, answer_field=d.answer_field, answer_format=d.answer_format,
        eval_size=d.eval_size, eval_fraction=d.eval_fraction, seed=d.seed,
        digits=d.digits, num_operands=d.num_operands, operators=d.operators,
    )  # fmt: skip
    train, held_out = load_examples(d.source, spec)
    fmt = PromptFormat(d.prompt_template, d.system_prompt, d.chat_template, d.max_prompt_tokens, d.overlong)
    return encode_prompts(train, fmt, tokenizer), encode_prompts(held_out, fmt, tokenizer)


def sampling_params(
    rollout: DictConfig, temperature: float | None = None, batch_size: int | None = None
) -> SamplingParams:
    if rollout.backend not in BACKENDS:
        raise RlctlError(f"rollout.backend: unknown backend {rollout.backend!r}; known: {sorted(BACKENDS)}")
    return SamplingParams(
        max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature if temperature is None else temperature,
        top_p=rollout.top_p, top_k=rollout.top_k, batch_size=batch_size or rollout.batch_size,
    )  # fmt: skip


def build_evaluator(cfg: DictConfig, held_out: PromptSet, tokenizer, rewards, autocast) -> Evaluator | None:
    if not cfg.eval.enabled or len(held_out) == 0:
        return None
    params = sampling_params(cfg.rollout, temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size)
    rollout = BACKENDS[cfg.rollout.backend](tokenizer, params, autocast)
    return Evaluator(held_out, rollout, rewards, cfg.eval.n_samples, list(cfg.eval.pass_k))


def load_model_and_tokenizer(cfg: DictConfig, weights_from: str | None = None):
    """The policy (from ``weights_from`` when resuming, else model.path) and its tokenizer."""
    m = cfg.model
    tokenizer = models.load_tokenizer(m.path, m.trust_remote_code)
    model = models.load_causal_lm(weights_from or m.path, tokenizer, m.dtype, m.trust_remote_code, seed=cfg.engine.seed)
    return model, tokenizer


def check_resumable(checkpoint: Path, cfg: DictConfig, needs_critic: bool) -> None:
    """A checkpoint resumes only the run it came from: same starting model, critic iff the algorithm has one."""
    import json

    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    if saved["model_path"] != cfg.model.path:
        raise RlctlError(
            f"resume: {checkpoint} was trained from model.path={saved['model_path']!r}, "
            f"but this run has model.path={cfg.model.path!r}; pass the same model or resume=never"
        )
    if saved["has_critic"] != needs_critic:
        raise RlctlError(
            f"resume: {checkpoint} {'has' if saved['has_critic'] else 'has no'} critic but algo={cfg.algo.name} "
            f"{'needs' if needs_critic else 'does not use'} one; resume with the algorithm it was trained with"
        )


def build_train(cfg: DictConfig, run_dir: Path, resume_command: str = "rlctl train resume=RUN_DIR") -> Stages:
    """Everything the loop needs, in the order a failure is cheapest: config checks, data, then models."""
    seed_everything(cfg.engine.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    algo = build_algorithm(cfg)
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        check_resumable(resume_from, cfg, algo.needs_values)
    rewards = build_rewards(cfg)
    batch_size = cfg.prompts_per_step * algo.group_size
    minibatch = cfg.optim.minibatch_size or batch_size
    for key, value in (("steps", cfg.steps), ("prompts_per_step", cfg.prompts_per_step),
                       ("optim.micro_batch_size", cfg.optim.micro_batch_size), ("algo.num_iterations", cfg.algo.num_iterations)):  # fmt: skip
        if value < 1:
            raise RlctlError(f"{key}: must be ≥ 1, got {value}")
    if batch_size % minibatch:
        raise RlctlError(
            f"optim.minibatch_size: {minibatch} does not divide the step's batch of "
            f"prompts_per_step × algo.group_size = {cfg.prompts_per_step} × {algo.group_size} = {batch_size}"
        )
    model, tokenizer = load_model_and_tokenizer(cfg, str(resume_from / "policy") if resume_from else None)
    train_prompts, held_out = build_prompts(cfg, tokenizer)
    if len(train_prompts) == 0:
        raise RlctlError(
            f"data: every training prompt is longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens}"
        )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    o = cfg.optim
    updates = cfg.steps * cfg.algo.num_iterations * (batch_size // minibatch)

    def optim_spec(lr: float, max_grad_norm: float) -> OptimSpec:
        """Policy and critic share the optimiser settings but their learning rate and clipping."""
        return OptimSpec(lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, schedule=o.schedule,
                         warmup_steps=o.warmup_steps, max_grad_norm=max_grad_norm, total_updates=updates)  # fmt: skip

    ranks = launched_ranks()
    zero = None
    if cfg.deepspeed.enabled:
        if cfg.deepspeed.stage not in (0, 1, 2, 3):
            raise RlctlError(f"deepspeed.stage: ZeRO stages are 0, 1, 2 and 3, got {cfg.deepspeed.stage}")
        if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
            raise RlctlError(
                "deepspeed.offload_params: parameters can be offloaded only under ZeRO-3 (deepspeed.stage=3)"
            )
        if cfg.engine.precision not in ("no", "bf16", "fp16"):
            raise RlctlError(f"engine.precision: must be one of no | bf16 | fp16, got {cfg.engine.precision!r}")
        if minibatch % o.micro_batch_size:
            raise RlctlError(
                f"optim.micro_batch_size: {o.micro_batch_size} must divide the minibatch of {minibatch} samples under DeepSpeed"
            )
        init_process_group(ranks, even_alone=True)
        zero = ZeroSpec(
            stage=cfg.deepspeed.stage, precision=cfg.engine.precision, micro_batch_size=o.micro_batch_size,
            accumulation_steps=minibatch // o.micro_batch_size, world_size=ranks.world_size,
            offload_optimizer=cfg.deepspeed.offload_optimizer, offload_params=cfg.deepspeed.offload_params,
        )  # fmt: skip

        def make_engine(module, spec):
            return DeepSpeedEngine(module, spec, zero)
    else:
        if ranks.world_size > 1:
            raise RlctlError(
                f"deepspeed: this launch has {ranks.world_size} processes; several processes train under DeepSpeed, "
                "so pick a stage (deepspeed=zero2, zero3, ...)"
            )
        accelerator = make_accelerator(cfg.engine.precision)

        def make_engine(module, spec):
            return Engine(accelerator, module, spec)

    if ranks.world_size > 1:
        seed_everything(cfg.engine.seed + ranks.rank)  # same weights everywhere, different samples per rank
    policy = make_engine(model, optim_spec(o.lr, o.max_grad_norm))
    critic = None
    if algo.needs_values:
        c = cfg.critic
        critic_model = models.load_value_model(
            str(resume_from / "critic") if resume_from else c.path or cfg.model.path,
            tokenizer,
            cfg.model.dtype,
            cfg.model.trust_remote_code,
            seed=cfg.engine.seed,
        )
        if cfg.model.gradient_checkpointing:
            critic_model.gradient_checkpointing_enable()
        critic = make_engine(critic_model, optim_spec(c.lr, c.max_grad_norm))
    reference = None
    if algo.needs_reference:
        reference = models.load_causal_lm(
            cfg.model.path, tokenizer, cfg.model.dtype, cfg.model.trust_remote_code, seed=cfg.engine.seed
        )
        reference = frozen_for_inference(reference, zero)

    sinks = [JsonlSink(run_dir / "metrics.jsonl")] if ranks.is_main else []  # one rank writes
    if cfg.logger.console and ranks.is_main:
        sinks.insert(0, ConsoleSink(cfg.steps))
    if cfg.logger.wandb and ranks.is_main:
        sinks.append(WandbSink(cfg.logger.wandb_project, cfg.logger.wandb_entity, run_dir, OmegaConf.to_container(cfg)))
    logger = Loggers(sinks)
    for name, prompts in (("training", train_prompts), ("held-out", held_out)):
        if prompts.skipped or prompts.truncated:
            logger.message(
                f"[yellow]data: {prompts.skipped} {name} prompts skipped and {prompts.truncated} truncated "
                f"(longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens}, data.overlong={cfg.data.overlong})"
            )
    logger.metrics({"data/train_prompts": len(train_prompts), "data/eval_prompts": len(held_out),
                    "data/prompts_skipped": train_prompts.skipped + held_out.skipped,
                    "data/prompts_truncated": train_prompts.truncated + held_out.truncated}, 0)  # fmt: skip

    rollout = BACKENDS[cfg.rollout.backend](tokenizer, sampling_params(cfg.rollout), policy.autocast)
    return Stages(
        tokenizer=tokenizer, policy=policy, critic=critic, reference=reference, rollout=rollout, rewards=rewards, algo=algo,
        train_prompts=train_prompts,
        sampler=PromptSampler(len(train_prompts), cfg.prompts_per_step * ranks.world_size, cfg.data.seed),
        evaluator=build_evaluator(cfg, held_out, tokenizer, rewards, policy.autocast), logger=logger,
        schedule=Schedule(
            steps=cfg.steps, prompts_per_step=cfg.prompts_per_step, num_iterations=cfg.algo.num_iterations,
            minibatch_size=minibatch, micro_batch_size=cfg.optim.micro_batch_size, temperature=cfg.rollout.temperature,
            max_new_tokens=cfg.rollout.max_new_tokens, sampling_retries=cfg.algo.sampling_retries,
            critic_warmup_steps=cfg.critic.warmup_steps, checkpoint_every=cfg.checkpoint.every,
            keep_last=cfg.checkpoint.keep_last, max_consecutive_skips=cfg.checkpoint.max_consecutive_skips,
            eval_every=cfg.eval.every, sample_every=cfg.logger.sample_every, samples_shown=cfg.logger.samples_shown,
            save_final=cfg.save_final,
        ),
        run_dir=run_dir,
        ranks=ranks,
        model_path=cfg.model.path,
        resume_from=resume_from,
        resume_command=resume_command,
    )  # fmt: skip
