"""The loop of the offline stages (`rlctl rm`, `rlctl sft`, `rlctl dpo`): fixed training examples,
one optimiser update per step on ``per_step`` of them per process, with the engine, checkpoints,
resume, metrics and held-out evaluation of ``rlctl train``.

What differs between the stages is an :class:`Objective`: how a step's rows become a batch, the loss
of a micro-batch (its share of the whole batch's loss over all ranks), and the held-out evaluation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig, OmegaConf

from rlctl.checkpoint import (
    CheckpointPolicy,
    StopRequest,
    drop_metrics_after,
    export_model,
    load_rng,
    read_trainer_state,
    resolve_resume,
    write_checkpoint,
)
from rlctl.config import fill
from rlctl.data import PromptSampler
from rlctl.distributed import Ranks, init_process_group, mean_over_ranks
from rlctl.errors import RlctlError, check_fields
from rlctl.logging import ConsoleSink, JsonlSink, LogFileSink, Loggers, LogSpec, Timer, WandbSink, seconds_since_start
from rlctl.lora import LoraSpec
from rlctl.optim.engine import DeepSpeedEngine, Engine, OptimSpec, ZeroSpec, make_accelerator
from rlctl.optim.update import LossFn, update


class Objective(Protocol):
    """What one offline stage trains for."""

    def describe(self) -> str: ...  # the run's first line: model, data, sizes

    def batch(self, index: list[int]): ...  # this rank's rows of a step (a Batch-like: size, rows, stat_weight)

    def loss_fn(self, engine, batch) -> LossFn: ...  # collective: counts the whole batch over ranks once

    def evaluate(self, engine) -> tuple[dict[str, float], str]: ...  # held-out results and their one-line summary


@dataclass(frozen=True)
class OfflineSettings:
    """The sizes and budget every offline stage shares, checked before anything loads."""

    per_step: int  # examples per optimiser update, per process
    epochs: float
    steps: int
    eval_enabled: bool
    eval_every: int

    def __post_init__(self) -> None:
        checks = (("epochs", self.epochs > 0 and math.isfinite(self.epochs), "must be > 0"),
                  ("steps", self.steps >= 0, "must be ≥ 0 (0 = as many as epochs take)"),
                  ("eval_every", self.eval_every >= 0, "must be ≥ 0"))  # fmt: skip
        check_fields(self, checks)

    def total_steps(self, n_examples: int, world_size: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * n_examples / (self.per_step * world_size)))


@dataclass
class OfflineRun:
    """Everything the offline loop uses, built once by the stage's ``build_*``."""

    name: str  # the command ("rm", "sft", "dpo"): in messages and the resume line
    objective: Objective
    tokenizer: object
    engine: Engine | DeepSpeedEngine
    sampler: PromptSampler
    settings: OfflineSettings
    micro_batch_size: int
    logger: Loggers
    checkpoints: CheckpointPolicy
    run_dir: Path
    steps: int
    save_final: bool
    ranks: Ranks = Ranks()
    resume_from: Path | None = None
    resume_command: str = "RUN_DIR"
    config: dict = field(default_factory=dict)


def offline_step(r: OfflineRun) -> dict[str, float]:
    """One optimiser update on ``per_step`` examples per process."""
    timer = Timer()
    everyone = r.sampler.next_batch()  # one global draw; each rank takes its own share
    per_rank = r.settings.per_step
    batch = r.objective.batch(everyone[r.ranks.rank * per_rank : (r.ranks.rank + 1) * per_rank])
    with timer("update"):
        grad_norm, stats = update(r.engine, batch, r.micro_batch_size, r.objective.loss_fn(r.engine, batch))
    metrics = {**stats, "lr": r.engine.lr, **timer.seconds}
    if math.isfinite(grad_norm):
        metrics["grad_norm"] = grad_norm
    metrics["optim/skipped_updates"] = float(not math.isfinite(grad_norm))
    metrics["time/step_s"] = sum(timer.seconds.values())
    return metrics


def _evaluate_and_log(r: OfflineRun, step: int, label: str) -> dict[str, float]:
    started = time.perf_counter()
    r.engine.model.eval()
    try:
        results, line = r.objective.evaluate(r.engine)
    finally:
        r.engine.model.train()
    results["time_s"] = time.perf_counter() - started
    r.logger.metrics({f"eval/{k}": v for k, v in results.items()}, step)
    r.logger.message(f"[bold]eval {label}:[/bold] {line}  ({results['time_s']:.1f}s)")
    return results


def _save(r: OfflineRun, step: int, eval_before: dict | None) -> Path:
    state = {"step": step, "eval_before": eval_before, "sampler": r.sampler.state_dict(), "has_critic": False,
             "world_size": r.ranks.world_size, "config": r.config}  # fmt: skip
    return write_checkpoint(r.run_dir, step, {"model": r.engine}, r.tokenizer, r.ranks, r.checkpoints.keep_last, state)


def train_offline(r: OfflineRun) -> dict:
    """Evaluate, train ``steps`` updates (checkpointing; SIGTERM/Ctrl-C stop cleanly), evaluate,
    write eval.json and checkpoints/final. Returns {"before", "after", "stopped_by", "wall_s"}."""
    started = time.perf_counter()
    summary: dict = {"stopped_by": None, "before": None, "after": None}
    r.logger.message(
        f"{r.objective.describe()}; {r.steps} steps of {r.settings.per_step} per process ({r.ranks.world_size} "
        f"process{'es' if r.ranks.world_size > 1 else ''}), micro-batches of {r.micro_batch_size}"
    )
    step, eval_before, resumed_at = 0, None, None
    if r.resume_from is not None:
        saved = read_trainer_state(r.resume_from)
        r.engine.load_training_state(r.resume_from / "model")
        r.sampler.load_state_dict(saved["sampler"])
        load_rng(r.resume_from, r.ranks.rank)
        step = resumed_at = saved["step"]
        eval_before = saved["eval_before"]
        r.logger.message(f"resumed from {r.resume_from} at step {step}")
    elif r.settings.eval_enabled:
        eval_before = _evaluate_and_log(r, 0, "before training")
    policy = r.checkpoints
    with StopRequest(acknowledge=lambda line: r.logger.message(f"[yellow]{line}")) as stop:
        while step < r.steps:
            step += 1
            metrics = {"step": step, **mean_over_ranks(offline_step(r))}
            r.logger.metrics(metrics, step)
            every = r.settings.eval_every
            if r.settings.eval_enabled and every and step % every == 0 and step != r.steps:
                _evaluate_and_log(r, step, f"at step {step}")
            if stop.signal_name is not None:
                path = _save(r, step, eval_before)
                summary["stopped_by"] = stop.signal_name
                r.logger.message(f"[bold yellow]{stop.signal_name}: stopped after step {step} and saved {path}.[/]\n"
                                 f"Resume with: {r.resume_command}")  # fmt: skip
                break
            if policy.every and step % policy.every == 0 and step != r.steps:
                _save(r, step, eval_before)
        else:
            if step != resumed_at:
                _save(r, step, eval_before)
    summary["before"] = eval_before
    if summary["stopped_by"] is None:
        if r.settings.eval_enabled:
            summary["after"] = _evaluate_and_log(r, step, "after training")
            if r.ranks.is_main:
                (r.run_dir / "eval.json").write_text(
                    json.dumps({"before": eval_before, "after": summary["after"]}, indent=2) + "\n"
                )
        if r.save_final:
            r.logger.message(f"saved the model to {export_model(r.run_dir, r.engine, r.tokenizer, r.ranks)}")
    summary["wall_s"] = time.perf_counter() - started
    r.logger.message(f"done: {summary['wall_s']:.0f}s in the loop, {seconds_since_start():.0f}s wall time with start-up; "
                         f"run folder: {r.run_dir}")  # fmt: skip
    return summary


# --- building -------------------------------------------------------------------------------------


def read_engine_settings(
    cfg: DictConfig, command: str, per_step_key: str, ranks: Ranks
) -> tuple[OptimSpec, ZeroSpec, int]:
    """``optim``, ``engine`` and ``deepspeed`` of an offline stage, checked: (optim, zero, micro-batch
    size). A step is one update on ``cfg[per_step_key]`` rows, so ``optim.minibatch_size`` stays 0."""
    from rlctl.build import check_precision

    per_step = cfg[per_step_key]
    unit = per_step_key.split("_")[0]
    optim = fill("optim", cfg.optim, OptimSpec, total_updates=1)
    if per_step < 1:
        raise RlctlError(f"{per_step_key}: must be ≥ 1, got {per_step}")
    if optim.minibatch_size:
        raise RlctlError(
            f"optim.minibatch_size: rlctl {command} makes one update of {per_step_key}={per_step} {unit} "
            f"per step; leave it at 0 (got {optim.minibatch_size}) and set {per_step_key}"
        )
    if optim.max_tokens_per_micro_batch:
        raise RlctlError(
            f"optim.max_tokens_per_micro_batch: rlctl {command} cuts micro-batches by rows (optim.micro_batch_size)"
            + ("; data.pack=true packs short demonstrations into rows instead" if command == "sft" else "")
            + f"; leave it at 0 (got {optim.max_tokens_per_micro_batch})"
        )
    micro = min(optim.micro_batch_size, per_step)
    if cfg.deepspeed.enabled and per_step % micro:
        raise RlctlError(
            f"optim.micro_batch_size: {optim.micro_batch_size} must divide {per_step_key}={per_step} under DeepSpeed "
            "(it needs a fixed number of equal micro-batches per update)"
        )
    check_precision(cfg.engine.precision)
    read_lora(cfg)
    zero = fill("deepspeed", cfg.deepspeed, ZeroSpec, precision=cfg.engine.precision, world_size=ranks.world_size,
                micro_batch_size=micro, accumulation_steps=math.ceil(per_step / micro))  # fmt: skip
    if ranks.world_size > 1 and not zero.enabled:
        raise RlctlError(
            f"deepspeed: this launch has {ranks.world_size} processes; pick a stage (deepspeed=zero2, ...)"
        )
    return optim, zero, micro


def open_run_folder(cfg: DictConfig, run_dir: Path, ranks: Ranks) -> tuple[Path | None, dict]:
    """(the checkpoint to resume from or None, the flat config the checkpoints record). A fresh
    start in a folder that trained is refused; a resume must keep what defines the run."""
    from rlctl.build import check_resumable, flat_config, refuse_a_second_run_in

    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = resolve_resume(cfg.resume, run_dir)
    config = flat_config(cfg)
    if resume_from is None:
        if ranks.is_main:
            refuse_a_second_run_in(run_dir)
    else:
        saved = check_resumable(resume_from, config, False, ranks.world_size)
        if ranks.is_main:
            drop_metrics_after(run_dir / "metrics.jsonl", saved["step"])
    return resume_from, config


def start_training(cfg: DictConfig, model, optim: OptimSpec, zero: ZeroSpec, ranks: Ranks, steps: int, run_dir: Path):
    """(engine, loggers) of an offline stage's model: gradient checkpointing if asked, the engine of
    ``steps`` updates, and the run folder's sinks."""
    from rlctl.models import checkpoint_activations

    if cfg.model.gradient_checkpointing:
        checkpoint_activations(model)
    return make_engine(model, optim, zero, cfg.engine.precision, ranks, steps), make_loggers(cfg, run_dir, steps, ranks)


def say_when_nothing_is_held_out(logger: Loggers, unit: str, trained: int, held_out: int, evaluating: bool) -> None:
    """One line when evaluation is on but the data left nothing to evaluate on (too few rows to hold any out)."""
    if evaluating and held_out == 0:
        logger.message(f"[yellow]data: no held-out {unit} ({trained} for training; data.eval_fraction holds out none of "
                       "so few, and there is no data.eval_path): nothing to evaluate")  # fmt: skip


def load_policy(cfg: DictConfig, tokenizer, resume_from: Path | None):
    """The causal LM an offline stage trains: the checkpoint's when resuming, else ``model.path``'s;
    with LoRA, ``model.path``'s weights and an adapter (new, or the checkpoint's)."""
    from rlctl import models
    from rlctl.build import with_adapter

    lora = read_lora(cfg)
    weights_from = str(resume_from / "model") if resume_from else None
    model = models.load_causal_lm(weights_from if weights_from and not lora.enabled else cfg.model.path, tokenizer,
                                  cfg.model.dtype, cfg.model.trust_remote_code, seed=cfg.engine.seed)  # fmt: skip
    return with_adapter(model, lora, weights_from)


def read_lora(cfg: DictConfig) -> LoraSpec:
    return fill("model.lora", cfg.model.lora, LoraSpec)


def make_engine(model, optim: OptimSpec, zero: ZeroSpec, precision: str, ranks: Ranks, steps: int):
    spec = replace(optim, total_updates=steps)
    if zero.enabled:
        init_process_group(ranks, even_alone=True)
        return DeepSpeedEngine(model, spec, zero)
    return Engine(make_accelerator(precision), model, spec)


def make_loggers(cfg: DictConfig, run_dir: Path, steps: int, ranks: Ranks) -> Loggers:
    """Console, train.log and metrics.jsonl (and W&B) on the main rank; nothing on the others."""
    log = fill("logger", cfg.logger, LogSpec)
    if not ranks.is_main:
        return Loggers([])
    sinks = [JsonlSink(run_dir / "metrics.jsonl"), LogFileSink(run_dir / "train.log", steps)]
    if log.console:
        sinks.insert(0, ConsoleSink(steps))
    if log.wandb:
        sinks.append(WandbSink(log.wandb_project, log.wandb_entity, run_dir, OmegaConf.to_container(cfg)))
    return Loggers(sinks)
