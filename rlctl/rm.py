"""`rlctl rm`: a reward model learned from preference pairs (Bradley-Terry).

The model is ``AutoModelForSequenceClassification`` with one label, started from a causal LM
(``model.path``): its body, and a new scalar head reading the last token. A step is one optimiser
update on ``pairs_per_step`` pairs per process, with the engine, checkpoints, metrics and
evaluation of ``rlctl train``. The loss of a minibatch of N pairs (over all ranks) is

    L = (1/N) Σ_i −log σ(r(x_i, y_i^chosen) − r(x_i, y_i^rejected) − m_i)

with m_i the pair's margin (its row's ``margin`` plus ``margin`` of the config, 0 by default).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from rlctl import models
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
from rlctl.data.preferences import EncodedPairs, PreferenceSpec, encode_pairs, load_pairs
from rlctl.distributed import Ranks, init_process_group, launched_ranks, mean_over_ranks, sum_over_ranks
from rlctl.errors import RlctlError, check_fields
from rlctl.logging import ConsoleSink, JsonlSink, LogFileSink, Loggers, LogSpec, Timer, WandbSink
from rlctl.optim.engine import DeepSpeedEngine, Engine, OptimSpec, ZeroSpec, make_accelerator
from rlctl.optim.update import update
from rlctl.rewards.model import right_pad, sequence_scores


@dataclass(frozen=True)
class PairBatch:
    """B preference pairs: token ids of both sides and each pair's margin [B]."""

    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    margins: torch.Tensor  # [B] float

    @property
    def size(self) -> int:
        return len(self.chosen_ids)

    @property
    def stat_weight(self) -> float:
        """What a micro-batch's stats are weighted by when averaged: its pairs."""
        return float(self.size)

    def rows(self, index: torch.Tensor) -> PairBatch:
        picked = index.tolist()
        return PairBatch([self.chosen_ids[i] for i in picked], [self.rejected_ids[i] for i in picked],
                         self.margins[index])  # fmt: skip


def pair_batch(pairs: EncodedPairs, index: list[int], extra_margin: float) -> PairBatch:
    margins = torch.tensor([pairs.pairs[i].margin + extra_margin for i in index], dtype=torch.float32)
    return PairBatch([pairs.chosen_ids[i] for i in index], [pairs.rejected_ids[i] for i in index], margins)


def pair_scores(model, batch: PairBatch, pad_id: int, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) from one forward pass over both sides, right-padded."""
    input_ids, mask = right_pad(batch.chosen_ids + batch.rejected_ids, pad_id)
    device = next(model.parameters()).device
    with autocast():
        scores = sequence_scores(model, input_ids.to(device), mask.to(device)).cpu()
    return scores[: batch.size], scores[batch.size :]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Σ_i −log σ(r_c,i − r_r,i − m_i) over the pairs given, [B] -> scalar (divided by the caller)."""
    return -F.logsigmoid(chosen - rejected - margins).sum()


@dataclass(frozen=True)
class RMSettings:
    """``rlctl rm``'s plain values, every one checked before anything loads."""

    pairs_per_step: int
    epochs: float
    steps: int
    margin: float
    eval_enabled: bool
    eval_every: int
    eval_batch_size: int

    def __post_init__(self) -> None:
        checks = (("pairs_per_step", self.pairs_per_step >= 1, "must be ≥ 1"),
                  ("epochs", self.epochs > 0 and math.isfinite(self.epochs), "must be > 0"),
                  ("steps", self.steps >= 0, "must be ≥ 0 (0 = as many as epochs take)"),
                  ("margin", math.isfinite(self.margin), "must be a finite number"),
                  ("eval_every", self.eval_every >= 0, "must be ≥ 0"),
                  ("eval_batch_size", self.eval_batch_size >= 1, "must be ≥ 1"))  # fmt: skip
        check_fields(self, checks)


@dataclass
class RMRun:
    """Everything the reward-model loop uses, built once by :func:`build_rm`."""

    tokenizer: object
    engine: Engine | DeepSpeedEngine
    train_pairs: EncodedPairs
    held_out: EncodedPairs
    sampler: PromptSampler
    settings: RMSettings
    micro_batch_size: int  # pairs per forward/backward
    logger: Loggers
    checkpoints: CheckpointPolicy
    run_dir: Path
    steps: int
    save_final: bool
    ranks: Ranks = Ranks()
    resume_from: Path | None = None
    resume_command: str = "rlctl rm resume=RUN_DIR"
    config: dict = field(default_factory=dict)


def rm_step(r: RMRun) -> dict[str, float]:
    """One optimiser update on ``pairs_per_step`` pairs per process."""
    timer = Timer()
    everyone = r.sampler.next_batch()  # one global draw; each rank takes its own share
    per_rank = r.settings.pairs_per_step
    mine = everyone[r.ranks.rank * per_rank : (r.ranks.rank + 1) * per_rank]
    batch = pair_batch(r.train_pairs, mine, r.settings.margin)
    (total_pairs,) = sum_over_ranks([float(batch.size)])
    pad_id = r.tokenizer.pad_token_id

    def loss_fn(micro: PairBatch):
        chosen, rejected = pair_scores(r.engine.model, micro, pad_id, r.engine.autocast)
        loss = bradley_terry_loss(chosen, rejected, micro.margins) / total_pairs  # this micro-batch's share
        gap = (chosen - rejected).detach()
        return loss, {"loss/rm": loss.detach(), "rm/accuracy": (gap > 0).float().mean(),
                      "rm/margin": gap.mean(), "rm/chosen": chosen.detach().mean(),
                      "rm/rejected": rejected.detach().mean()}  # fmt: skip

    with timer("update"):
        grad_norm, stats = update(r.engine, batch, r.micro_batch_size, loss_fn)
    metrics = {**stats, "lr": r.engine.lr, **timer.seconds}
    if math.isfinite(grad_norm):
        metrics["grad_norm"] = grad_norm
    metrics["optim/skipped_updates"] = float(not math.isfinite(grad_norm))
    metrics["time/step_s"] = sum(timer.seconds.values())
    return metrics


@torch.no_grad()
def evaluate_pairs(r: RMRun) -> dict[str, float]:
    """Pairwise accuracy (r_chosen > r_rejected) and the mean gap over the held-out pairs. Every rank
    scores all of them (the same forward passes: ZeRO-3 gathers collectively)."""
    started = time.perf_counter()
    model = r.engine.model
    model.eval()
    gaps = []
    for start in range(0, len(r.held_out), r.settings.eval_batch_size):
        index = list(range(start, min(start + r.settings.eval_batch_size, len(r.held_out))))
        chosen, rejected = pair_scores(model, pair_batch(r.held_out, index, 0.0), r.tokenizer.pad_token_id,
                                       r.engine.autocast)  # fmt: skip
        gaps.append(chosen - rejected)
    model.train()
    gap = torch.cat(gaps)
    results = {"pairwise_accuracy": float((gap > 0).float().mean()), "margin_mean": float(gap.mean()),
               "n_pairs": len(r.held_out)}  # fmt: skip
    kinds = [pair.kind for pair in r.held_out.pairs]
    for kind in sorted(set(kinds) - {""}):  # built-in pairs: each kind of worse reply on its own
        picked = torch.tensor([k == kind for k in kinds])
        results[f"pairwise_accuracy/{kind}"] = float((gap[picked] > 0).float().mean())
    results["time_s"] = time.perf_counter() - started
    return results


def _evaluate_and_log(r: RMRun, step: int, label: str) -> dict[str, float]:
    results = evaluate_pairs(r)
    r.logger.metrics({f"eval/{k}": v for k, v in results.items()}, step)
    r.logger.message(
        f"[bold]eval {label}:[/bold] pairwise accuracy {results['pairwise_accuracy']:.3f}  "
        f"margin {results['margin_mean']:.3f}  ({results['n_pairs']} held-out pairs, {results['time_s']:.1f}s)"
    )
    return results


def _save(r: RMRun, step: int, eval_before: dict | None) -> Path:
    state = {"step": step, "eval_before": eval_before, "sampler": r.sampler.state_dict(), "has_critic": False,
             "world_size": r.ranks.world_size, "config": r.config}  # fmt: skip
    return write_checkpoint(r.run_dir, step, {"model": r.engine}, r.tokenizer, r.ranks, r.checkpoints.keep_last, state)


def train_rm(r: RMRun) -> dict:
    """Evaluate, train ``steps`` updates (checkpointing; SIGTERM/Ctrl-C stop cleanly), evaluate,
    write eval.json and checkpoints/final. Returns {"before", "after", "stopped_by", "wall_s"}."""
    started = time.perf_counter()
    summary: dict = {"stopped_by": None, "before": None, "after": None}
    held_out = r.settings.eval_enabled and len(r.held_out) > 0
    r.logger.message(
        f"reward model: {type(r.engine.unwrapped()).__name__} (one label), {len(r.train_pairs)} training pairs, {len(r.held_out)} held-out; {r.steps} steps of "
        f"{r.settings.pairs_per_step} pairs per process ({r.ranks.world_size} process"
        f"{'es' if r.ranks.world_size > 1 else ''}), micro-batches of {r.micro_batch_size} pairs"
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
    elif held_out:
        eval_before = _evaluate_and_log(r, 0, "before training")
    policy = r.checkpoints
    with StopRequest() as stop:
        while step < r.steps:
            step += 1
            metrics = {"step": step, **mean_over_ranks(rm_step(r))}
            r.logger.metrics(metrics, step)
            every = r.settings.eval_every
            if held_out and every and step % every == 0 and step != r.steps:
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
        if held_out:
            summary["after"] = _evaluate_and_log(r, step, "after training")
            if r.ranks.is_main:
                (r.run_dir / "eval.json").write_text(
                    json.dumps({"before": eval_before, "after": summary["after"]}, indent=2) + "\n"
                )
        if r.save_final:
            r.logger.message(f"saved the reward model to {export_model(r.run_dir, r.engine, r.tokenizer, r.ranks)}")
    summary["wall_s"] = time.perf_counter() - started
    r.logger.message(f"done in {summary['wall_s']:.0f}s; run folder: {r.run_dir}")
    return summary


def read_rm_settings(cfg: DictConfig, ranks: Ranks) -> tuple[RMSettings, PreferenceSpec, OptimSpec, ZeroSpec]:
    """Every value of the ``rm`` config checked, one-line errors naming the key; nothing loaded."""
    from rlctl.build import check_precision

    settings = RMSettings(
        pairs_per_step=cfg.pairs_per_step, epochs=cfg.epochs, steps=cfg.steps, margin=cfg.margin,
        eval_enabled=cfg.eval.enabled, eval_every=cfg.eval.every, eval_batch_size=cfg.eval.batch_size,
    )  # fmt: skip
    data = fill("data", cfg.data, PreferenceSpec)
    optim = fill("optim", cfg.optim, OptimSpec, total_updates=1)
    if optim.minibatch_size:
        raise RlctlError(
            f"optim.minibatch_size: rlctl rm makes one update of pairs_per_step={cfg.pairs_per_step} pairs per step; "
            f"leave it at 0 (got {optim.minibatch_size}) and set pairs_per_step"
        )
    micro = min(optim.micro_batch_size, settings.pairs_per_step)
    if cfg.deepspeed.enabled and settings.pairs_per_step % micro:
        raise RlctlError(
            f"optim.micro_batch_size: {optim.micro_batch_size} must divide pairs_per_step={settings.pairs_per_step} "
            "under DeepSpeed (it needs a fixed number of equal micro-batches per update)"
        )
    check_precision(cfg.engine.precision)
    zero = fill("deepspeed", cfg.deepspeed, ZeroSpec, precision=cfg.engine.precision, world_size=ranks.world_size,
                micro_batch_size=micro, accumulation_steps=math.ceil(settings.pairs_per_step / micro))  # fmt: skip
    if ranks.world_size > 1 and not zero.enabled:
        raise RlctlError(
            f"deepspeed: this launch has {ranks.world_size} processes; pick a stage (deepspeed=zero2, ...)"
        )
    models.check_path(cfg.model.path, "model.path")
    return settings, data, optim, zero


def load_rm_model(path: str, tokenizer, dtype: str, trust_remote_code: bool, seed: int):
    """The reward model to train: a sequence classifier with one label on the body of ``path`` (a
    causal LM, or a reward model to train further). ``random:tiny`` builds a tiny one."""
    from transformers import AutoModelForSequenceClassification

    if path.startswith(models.RANDOM_PREFIX):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            config = models.tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                        tokenizer.pad_token_id)  # fmt: skip
            config.num_labels = 1
            return AutoModelForSequenceClassification.from_config(config, dtype=getattr(torch, dtype))
    from transformers.utils import logging as hf_logging

    source = models.resolve(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the new head "missing": that is the point here
    with torch.random.fork_rng():  # the new head's initial weights follow engine.seed
        torch.manual_seed(seed)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise RlctlError(f"model.path: cannot load {path!r} as a reward model: {models.first_line(err)}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not padding
    return model


def build_rm(cfg: DictConfig, run_dir: Path, resume_command: str) -> RMRun:
    """Config -> the reward-model run: every check, the pairs, then the model."""
    from rlctl.build import check_resumable, flat_config, refuse_a_second_run_in, seed_everything

    ranks = launched_ranks()
    settings, data, optim, zero = read_rm_settings(cfg, ranks)
    seed_everything(cfg.engine.seed)
    train_pairs, held_out_pairs = load_pairs(data)  # data errors come before any model loads
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
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    train, held_out = (encode_pairs(p, tokenizer, data.max_tokens) for p in (train_pairs, held_out_pairs))
    if len(train) == 0:
        raise RlctlError(f"data: every training pair has a side longer than data.max_tokens={data.max_tokens}")
    pairs_all = settings.pairs_per_step * ranks.world_size
    steps = settings.steps or max(1, math.ceil(settings.epochs * len(train) / pairs_all))
    model = load_rm_model(str(resume_from / "model") if resume_from else cfg.model.path, tokenizer, cfg.model.dtype,
                          cfg.model.trust_remote_code, cfg.engine.seed)  # fmt: skip
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    spec = replace(optim, total_updates=steps)
    if zero.enabled:
        init_process_group(ranks, even_alone=True)
        engine = DeepSpeedEngine(model, spec, zero)
    else:
        engine = Engine(make_accelerator(cfg.engine.precision), model, spec)
    log = fill("logger", cfg.logger, LogSpec)
    sinks = [JsonlSink(run_dir / "metrics.jsonl"), LogFileSink(run_dir / "train.log", steps)] if ranks.is_main else []
    if log.console and ranks.is_main:
        sinks.insert(0, ConsoleSink(steps))
    if log.wandb and ranks.is_main:
        sinks.append(WandbSink(log.wandb_project, log.wandb_entity, run_dir, OmegaConf.to_container(cfg)))
    logger = Loggers(sinks)
    for name, pairs in (("training", train), ("held-out", held_out)):
        if pairs.skipped:
            logger.message(f"[yellow]data: {pairs.skipped} {name} pairs skipped (a side longer than "
                           f"data.max_tokens={data.max_tokens})")  # fmt: skip
    return RMRun(
        tokenizer=tokenizer, engine=engine, train_pairs=train, held_out=held_out,
        sampler=PromptSampler(len(train), pairs_all, data.seed), settings=settings,
        micro_batch_size=min(optim.micro_batch_size, settings.pairs_per_step), logger=logger,
        checkpoints=fill("checkpoint", cfg.checkpoint, CheckpointPolicy), run_dir=run_dir, steps=steps,
        save_final=cfg.save_final, ranks=ranks, resume_from=resume_from, resume_command=resume_command, config=config,
    )  # fmt: skip
