"""`rlctl sft`: supervised fine-tuning on demonstrations, the step before RL.

The loss of a step's N demonstrations (over all ranks) is the mean negative log-likelihood of the
tokens the loss covers (assistant turns; see ``data.demonstrations``):

    L = −(1/T) Σ_i Σ_t m_i,t · log π(x_i,t | x_i,<t),      T = Σ_i Σ_t m_i,t

T counted once over the whole step on every rank, so micro-batches, packing and ranks all give the
gradient of the one batch. Evaluation: the held-out loss, and, for task data (rows with an answer),
held-out accuracy by the reward rules of ``rlctl train``, generating greedily.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.markup import escape

from rlctl import models
from rlctl.checkpoint import CheckpointPolicy
from rlctl.config import fill
from rlctl.data import PromptSampler, encode_prompts
from rlctl.data.demonstrations import (
    DemonstrationSpec,
    EncodedDemonstrations,
    encode_demonstrations,
    load_demonstrations,
)
from rlctl.data.prompts import PromptFormat
from rlctl.data.sources import Example, SourceSpec
from rlctl.distributed import Ranks, launched_ranks, sum_over_ranks
from rlctl.envs import EnvSpec, environment_factory
from rlctl.errors import RlctlError
from rlctl.evaluate import Evaluator, HeldOutRewardFailed
from rlctl.offline import (
    OfflineRun,
    OfflineSettings,
    load_policy,
    open_run_folder,
    read_engine_settings,
    say_when_nothing_is_held_out,
    start_training,
)
from rlctl.optim.scoring import pack_rows, pad_rows, target_logprobs
from rlctl.rollout import HFRollout, SamplingParams
from rlctl.rollout.multiturn import EnvironmentRollout


@dataclass(frozen=True)
class TokenBatch:
    """B token sequences and their loss masks (1 = trained)."""

    ids: list[list[int]]
    masks: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def stat_weight(self) -> float:
        """Micro-batch stats are token means: weighted by the tokens the loss covers."""
        return float(sum(sum(m) for m in self.masks))

    def rows(self, index: torch.Tensor) -> TokenBatch:
        picked = index.tolist()
        return TokenBatch([self.ids[i] for i in picked], [self.masks[i] for i in picked])


def sequence_nll(
    model, batch: TokenBatch, pad_id: int, pack_tokens: int, autocast
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over covered tokens of −log π, their count) for a micro-batch, packed when ``pack_tokens`` > 0."""
    rows = (
        pack_rows(batch.ids, batch.masks, pack_tokens, pad_id)
        if pack_tokens
        else pad_rows(batch.ids, batch.masks, pad_id)
    )
    device = next(model.parameters()).device
    input_ids, attention, positions, loss_mask = (t.to(device) if t is not None else None for t in rows)
    with autocast():
        logp, mask = target_logprobs(model, input_ids, attention, positions, loss_mask)
    return -(logp * mask).sum(), mask.sum()


@dataclass
class SupervisedObjective:
    """Token NLL on demonstrations; evaluated by held-out NLL and, for task data, accuracy."""

    model_name: str
    train: EncodedDemonstrations
    held_out: EncodedDemonstrations
    pad_id: int
    pack_tokens: int  # 0 = pad each micro-batch; else pack it into rows of at most this many tokens
    eval_batch_size: int
    autocast: object
    evaluator: Evaluator | None  # held-out accuracy (rows with an answer), else None
    env: str | None = None  # the environment tool-use demonstrations act in (calculator)

    @property
    def next_command(self) -> str:
        """What to run with the model this SFT made: RL, in the demonstrations' environment if any."""
        return f"rlctl train {f'env={self.env} ' if self.env else ''}model.path={{final}}"

    def describe(self) -> str:
        covered = sum(sum(m) for m in self.train.masks)
        total = sum(len(i) for i in self.train.ids)
        return (f"sft: {self.model_name}, {len(self.train)} demonstrations ({covered} of {total} tokens trained), "
                f"{len(self.held_out)} held-out{', packed' if self.pack_tokens else ''}")  # fmt: skip

    def batch(self, index: list[int]) -> TokenBatch:
        return TokenBatch([self.train.ids[i] for i in index], [self.train.masks[i] for i in index])

    def loss_fn(self, engine, batch: TokenBatch):
        (total_tokens,) = sum_over_ranks([batch.stat_weight])

        def loss_fn(micro: TokenBatch):
            nll, tokens = sequence_nll(engine.model, micro, self.pad_id, self.pack_tokens, self.autocast)
            loss = nll / max(total_tokens, 1.0)  # this micro-batch's share of the step's token mean
            return loss, {"loss/sft": loss.detach(), "sft/token_nll": nll.detach() / tokens.clamp(min=1)}

        return loss_fn

    @torch.no_grad()
    def evaluate(self, engine) -> tuple[dict[str, float], str]:
        nll, tokens = 0.0, 0.0
        for start in range(0, len(self.held_out), self.eval_batch_size):
            rows = slice(start, start + self.eval_batch_size)
            part_nll, part_tokens = sequence_nll(engine.model, TokenBatch(self.held_out.ids[rows], self.held_out.masks[rows]),
                                                 self.pad_id, 0, self.autocast)  # fmt: skip
            nll, tokens = nll + float(part_nll), tokens + float(part_tokens)
        results = {"loss": nll / max(tokens, 1.0), "n_demonstrations": len(self.held_out)}
        line = f"held-out loss {results['loss']:.4f} ({len(self.held_out)} demonstrations)"
        if self.evaluator is not None:
            try:
                task = self.evaluator(engine)
            except HeldOutRewardFailed as err:
                return {**results, "error": str(err)}, line + f"  no accuracy: {escape(str(err))}"
            results.update(task)
            if not task:  # every held-out prompt was longer than data.max_prompt_tokens
                return results, line
            line += f"  accuracy {task['accuracy']:.3f}  reward {task['reward_mean']:.3f} ({task['n_prompts']} prompts)"
            if self.evaluator.last_failures:
                line += f"\n[yellow]  {escape(self.evaluator.last_failures)}[/yellow]"
        return results, line


@dataclass(frozen=True)
class SFTEvalSpec:
    enabled: bool
    every: int
    batch_size: int
    max_new_tokens: int

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be ≥ 1, got {getattr(self, key)}")


def task_evaluator(rewards, examples: list[Example], fmt: PromptFormat, tokenizer, spec: SFTEvalSpec, autocast,
                   env: str | None = None):  # fmt: skip
    """Greedy held-out accuracy judged by ``rewards`` (a WeightedRewards), or None without examples.
    With ``env`` (tool-use demonstrations) each held-out question is played in that environment."""
    if not examples:
        return None
    prompts = encode_prompts(examples, fmt, tokenizer)
    params = SamplingParams(backend="hf", max_new_tokens=spec.max_new_tokens, temperature=0.0,
                            batch_size=spec.batch_size)  # fmt: skip
    rollout = HFRollout(tokenizer, params, autocast)
    if env is not None:
        env_spec = EnvSpec(name=env)
        rollout = EnvironmentRollout(rollout, tokenizer, environment_factory(env_spec), env_spec, fmt.chat_template)
    return Evaluator(prompts, rollout, rewards, 1, [1])


def read_sft_settings(cfg: DictConfig, ranks: Ranks):
    """Every value of the ``sft`` config checked, one-line errors naming the key; nothing loaded."""
    from rlctl.build import reward_settings

    eval_spec = fill("eval", cfg.eval, SFTEvalSpec)
    settings = OfflineSettings(per_step=cfg.examples_per_step, epochs=cfg.epochs, steps=cfg.steps,
                               eval_enabled=eval_spec.enabled, eval_every=eval_spec.every)  # fmt: skip
    optim, zero, micro = read_engine_settings(cfg, "sft", "examples_per_step", ranks)
    source, fmt, demo = fill("data", cfg.data, SourceSpec, PromptFormat, DemonstrationSpec)
    reward_settings(cfg.reward)
    models.check_path(cfg.model.path, "model.path")
    return settings, eval_spec, source, fmt, demo, optim, zero, micro


def build_sft(cfg: DictConfig, run_dir: Path, resume_command: str) -> OfflineRun:
    """Config -> the SFT run: every check, the demonstrations, then the model."""
    from rlctl.build import build_rewards, prepare_process

    ranks = launched_ranks()
    settings, eval_spec, source, fmt, demo, optim, zero, micro = read_sft_settings(cfg, ranks)
    prepare_process(cfg.engine)
    train_demos, held_out_demos = load_demonstrations(source, fmt, demo)  # data errors come before any model loads
    resume_from, config = open_run_folder(cfg, run_dir, ranks)
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    train, held_out = (encode_demonstrations(d, tokenizer, demo.max_tokens) for d in (train_demos, held_out_demos))
    if len(train) == 0:
        raise RlctlError(f"data: every demonstration is longer than data.max_tokens={demo.max_tokens}")
    steps = settings.total_steps(len(train), ranks.world_size)
    engine, logger = start_training(cfg, load_policy(cfg, tokenizer, resume_from), optim, zero, ranks, steps, run_dir)
    for name, part in (("training", train), ("held-out", held_out)):
        if part.skipped:
            logger.message(f"[yellow]data: {part.skipped} {name} demonstrations skipped (longer than "
                           f"data.max_tokens={demo.max_tokens})")  # fmt: skip
    examples = [Example(d.question or d.prompt, d.answer, d.origin) for d in held_out.demonstrations
                if d.answer is not None]  # fmt: skip
    env = next((d.env for d in held_out.demonstrations), None)
    evaluator = task_evaluator(build_rewards(cfg, autocast=engine.autocast), examples, replace(fmt, system_prompt=None),
                               tokenizer, eval_spec, engine.autocast, env)  # fmt: skip
    say_when_nothing_is_held_out(logger, "demonstrations", len(train), len(held_out), settings.eval_enabled)
    objective = SupervisedObjective(type(engine.unwrapped()).__name__, train, held_out, tokenizer.pad_token_id,
                                    demo.max_tokens if demo.pack else 0, eval_spec.batch_size, engine.autocast,
                                    evaluator, env)  # fmt: skip
    return OfflineRun(
        name="sft", objective=objective, tokenizer=tokenizer, engine=engine,
        sampler=PromptSampler(len(train), settings.per_step * ranks.world_size, source.seed),
        settings=replace(settings, eval_enabled=settings.eval_enabled and len(held_out) > 0),
        micro_batch_size=micro, logger=logger, checkpoints=fill("checkpoint", cfg.checkpoint, CheckpointPolicy),
        run_dir=run_dir, steps=steps, save_final=cfg.save_final, ranks=ranks, resume_from=resume_from,
        resume_command=resume_command, config=config,
    )  # fmt: skip
