"""The training loop. ``train_step`` reads top to bottom: sample, reward, score, advantages,
optimise. It never asks which algorithm it runs; ``stages.algo`` answers every such question."""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rlctl.algos import AdvantageInputs, Algorithm, ops, shaping
from rlctl.batch import Batch, concat
from rlctl.checkpoint import (
    begin_checkpoint,
    commit_checkpoint,
    latest_checkpoint,
    load_rng,
    publish_folder,
    read_trainer_state,
    save_rng,
)
from rlctl.data import PromptSampler, PromptSet
from rlctl.distributed import Ranks, any_rank, barrier, mean_over_ranks
from rlctl.engine import Engine
from rlctl.errors import RlctlError
from rlctl.evaluate import Evaluator
from rlctl.logging import Loggers
from rlctl.rewards import WeightedRewards
from rlctl.rollout import HFRollout
from rlctl.rollout.hf import step_rewards_to_tokens
from rlctl.scoring import response_logprobs, response_values


@dataclass(frozen=True)
class Schedule:
    """Plain values the loop needs, read from the config once by ``build``."""

    steps: int
    prompts_per_step: int
    num_iterations: int
    minibatch_size: int  # samples per optimiser update
    micro_batch_size: int  # samples per forward/backward
    temperature: float  # sampling temperature, also applied when scoring
    max_new_tokens: int
    sampling_retries: int  # dynamic sampling: extra rollouts allowed to fill the batch
    critic_warmup_steps: int  # steps during which only the critic trains
    eval_every: int  # 0 = before and after only
    sample_every: int  # steps between sample tables (0 = never)
    samples_shown: int
    save_final: bool
    checkpoint_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    max_consecutive_skips: int = 3


@dataclass
class Stages:
    tokenizer: object
    policy: Engine
    critic: Engine | None  # exists iff the algorithm's advantage estimator needs values
    reference: torch.nn.Module | None  # frozen; None when the algorithm has no KL term
    rollout: HFRollout
    rewards: WeightedRewards
    algo: Algorithm
    train_prompts: PromptSet
    sampler: PromptSampler
    evaluator: Evaluator | None
    logger: Loggers
    schedule: Schedule
    run_dir: Path
    ranks: Ranks = Ranks()  # this process's place in a data-parallel launch
    model_path: str = ""  # what the policy was initialised from; a checkpoint must match it to resume
    resume_from: Path | None = None  # a checkpoint whose weights build already loaded
    resume_command: str = "rlctl train resume=RUN_DIR"  # printed when a run is stopped early


@dataclass
class TrainState:
    """What changes from step to step besides the models (and what a checkpoint must keep)."""

    step: int = 0
    kl_coef: float = 0.0
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    eval_before: dict | None = None


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}_s"] = self.seconds.get(f"time/{name}_s", 0.0) + time.perf_counter() - start


def train_step(s: Stages, state: TrainState) -> dict[str, float]:
    """One step of on-policy RL: P prompts × G completions -> one or more optimiser updates."""
    timer, algo, sched = Timer(), s.algo, s.schedule
    policy = s.policy.model

    # 1-2. Rollout and reward: P prompts × G completions, scored (more prompts if groups are filtered).
    batch, sampling_metrics = _sample_and_score(s, timer)
    mask = batch.response_mask

    # 3. Score the samples without gradients: reference and sampling-policy log-probs, critic values.
    with timer("ref"), torch.no_grad():
        ref_logp = _logprobs(s, s.reference, batch) if s.reference is not None else None
        old_logp = _logprobs(s, policy, batch) if sched.num_iterations > 1 or algo.kl_in_reward else None
        values = _values(s, s.critic.model, batch) if s.critic is not None else None
    batch = batch.with_(ref_logprobs=ref_logp, old_logprobs=old_logp, values=values)

    # 4. Advantages: per-token rewards (score on the last token or step rewards, minus β·KL if in the reward).
    token_rewards = algo.token_rewards(batch.scores, mask, batch.step_rewards, old_logp, ref_logp, state.kl_coef)
    advantages, returns = algo.advantages(
        AdvantageInputs(batch.scores, mask, algo.group_size, token_rewards=token_rewards, values=values)
    )
    batch = batch.with_(token_rewards=token_rewards, advantages=advantages, returns=returns)

    # 5. Optimise: num_iterations passes over shuffled minibatches (the policy waits out the critic warm-up).
    with timer("update"):
        update_metrics = _optimise(s, batch, state.kl_coef, train_policy=state.step > sched.critic_warmup_steps)

    # 6. Health and the KL coefficient: count a skipped (non-finite) update; adapt β to the measured KL.
    skipped = update_metrics.pop("optim/skipped_updates") > 0
    state.skipped_steps += skipped
    state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
    kl_coef_used = state.kl_coef
    if "kl" in update_metrics and not skipped:  # β must stay the same on every rank: adapt to the mean KL
        measured = mean_over_ranks({"kl": update_metrics["kl"]})["kl"]
        state.kl_coef = algo.next_kl_coef(state.kl_coef, measured, batch.size * s.ranks.world_size)

    metrics = {
        **_batch_metrics(batch, s.rewards, algo),
        **sampling_metrics,
        **update_metrics,
        "kl_coef": kl_coef_used,
        "lr": s.policy.lr,
        "health/skipped_steps": float(state.skipped_steps),
        **timer.seconds,
    }
    metrics["time/step_s"] = sum(timer.seconds.values())
    metrics["throughput/tokens_per_s"] = float(batch.attention_mask.sum()) / metrics["time/step_s"]
    if sched.sample_every and (state.step - 1) % sched.sample_every == 0:
        s.logger.samples(_sample_rows(batch, sched.samples_shown), state.step)
    return metrics


def _sample_and_score(s: Stages, timer: Timer) -> tuple[Batch, dict[str, float]]:
    """Generate and score P prompts' groups; with dynamic sampling keep only groups whose rewards
    differ and sample more prompts until P such groups are found or the retries run out."""
    algo, sched = s.algo, s.schedule
    kept: list[Batch] = []
    n_kept = n_sampled = 0
    term_sums: dict[str, float] = {}
    errors_before = s.rewards.errors
    for _attempt in range(1 + (sched.sampling_retries if algo.dynamic_sampling else 0)):
        with timer("rollout"), s.policy.generation_context():
            # one global draw of P × world prompts; each rank takes its own P (all G samples stay together)
            everyone = s.sampler.next_batch()
            picked = everyone[s.ranks.rank * sched.prompts_per_step : (s.ranks.rank + 1) * sched.prompts_per_step]
            batch = s.rollout.generate(
                s.policy.unwrapped(),
                [s.train_prompts.token_ids[i] for i in picked],
                [s.train_prompts.examples[i].answer for i in picked],
                algo.group_size,
                prompt_texts=[_display(s.train_prompts.examples[i].prompt) for i in picked],
            )
        with timer("reward"):
            result = s.rewards(batch.completions, batch.answers)
            lengths = batch.response_mask.sum(dim=1)
            batch = batch.with_(
                scores=algo.shape_scores(result.scores, lengths, sched.max_new_tokens), correct=result.correct
            )
        n_sampled += len(picked)
        for name, values in result.per_term.items():  # unshaped, over everything sampled
            term_sums[name] = term_sums.get(name, 0.0) + float(values.sum())
        batch = _with_steps(s, batch, result.steps)
        if not algo.dynamic_sampling:
            metrics = {f"reward/{k}": v / batch.size for k, v in term_sums.items()}
            return batch, {**metrics, "reward/errors": float(s.rewards.errors - errors_before)}
        keep = shaping.groups_with_signal(batch.scores, algo.group_size).repeat_interleave(algo.group_size)
        if keep.any():
            kept.append(batch.rows(torch.nonzero(keep).squeeze(1)))
            n_kept += int(keep.sum()) // algo.group_size
        uniform = batch.rows(torch.nonzero(~keep).squeeze(1))
        if not any_rank(n_kept < sched.prompts_per_step):  # ranks retry together: rollouts are collective under ZeRO-3
            break
    metrics = {"sampling/prompts_sampled": float(n_sampled), "sampling/groups_kept": float(n_kept)}
    metrics.update({f"reward/{k}": v / (n_sampled * algo.group_size) for k, v in term_sums.items()})
    metrics["reward/errors"] = float(s.rewards.errors - errors_before)
    # Too few groups with signal: top up with groups from the last rollout (their advantages are 0),
    # so every step, and every rank, trains on the same number of samples.
    batch = concat([b for b in (*kept, uniform) if b.size > 0], s.tokenizer.pad_token_id)
    return batch.rows(torch.arange(sched.prompts_per_step * algo.group_size)), metrics


def _with_steps(s: Stages, batch: Batch, steps) -> Batch:
    if steps is None:
        return batch
    responses = batch.input_ids[:, -batch.response_length :]
    return batch.with_(step_rewards=step_rewards_to_tokens(s.tokenizer, responses, batch.response_mask, steps))


def _display(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _chunks(s: Stages, batch: Batch):
    for start in range(0, batch.size, s.schedule.micro_batch_size):
        yield slice(start, start + s.schedule.micro_batch_size)


def _logprobs(s: Stages, model, batch: Batch) -> torch.Tensor:
    out = []
    for rows in _chunks(s, batch):
        with s.policy.autocast():
            logp, _ = response_logprobs(
                model, batch.input_ids[rows], batch.attention_mask[rows], batch.response_length, s.schedule.temperature
            )
        out.append(logp)
    return torch.cat(out)


def _values(s: Stages, critic, batch: Batch) -> torch.Tensor:
    out = []
    for rows in _chunks(s, batch):
        with s.policy.autocast():
            out.append(
                response_values(critic, batch.input_ids[rows], batch.attention_mask[rows], batch.response_length)
            )
    return torch.cat(out)


def _optimise(s: Stages, batch: Batch, kl_coef: float, train_policy: bool) -> dict[str, float]:
    sched, algo = s.schedule, s.algo
    sums: dict[str, float] = {}
    weight_total = 0.0
    grad_norms, critic_grad_norms = [], []
    for _ in range(sched.num_iterations):
        order = torch.randperm(batch.size)
        for start in range(0, batch.size, sched.minibatch_size):
            minibatch = batch.rows(order[start : start + sched.minibatch_size])
            for micro_start in range(0, minibatch.size, sched.micro_batch_size):
                micro = minibatch.rows(
                    torch.arange(micro_start, min(micro_start + sched.micro_batch_size, minibatch.size))
                )
                weight = ops.micro_batch_weight(micro.response_mask, minibatch.response_mask, algo.loss_agg)
                stats: dict[str, torch.Tensor] = {}
                if train_policy:
                    with s.policy.autocast():
                        logp, entropy = response_logprobs(
                            s.policy.model, micro.input_ids, micro.attention_mask, micro.response_length,
                            sched.temperature, with_entropy=True, entropy_grad=algo.entropy_coef != 0,
                        )  # fmt: skip
                    old = micro.old_logprobs if micro.old_logprobs is not None else logp.detach()
                    loss, stats = algo.loss(
                        logp, old, micro.advantages, micro.response_mask, micro.ref_logprobs, entropy, kl_coef
                    )
                    s.policy.backward(loss * weight)
                    stats = {"loss/total": loss.detach(), **stats}
                if s.critic is not None:
                    with s.critic.autocast():
                        values = response_values(
                            s.critic.model, micro.input_ids, micro.attention_mask, micro.response_length
                        )
                    critic_loss, critic_stats = algo.critic_loss(
                        values, micro.values, micro.returns, micro.response_mask
                    )
                    critic_weight = ops.micro_batch_weight(micro.response_mask, minibatch.response_mask, "token-mean")
                    s.critic.backward(critic_loss * critic_weight)
                    stats.update(critic_stats)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * weight
                weight_total += weight
            if train_policy:
                grad_norms.append(s.policy.step())
            if s.critic is not None:
                critic_grad_norms.append(s.critic.step())
    metrics = {key: value / max(weight_total, 1e-12) for key, value in sums.items()}
    finite = [g for g in grad_norms if math.isfinite(g)]
    metrics["optim/updates"] = float(len(finite))
    metrics["optim/skipped_updates"] = float(len(grad_norms) - len(finite))
    if finite:
        metrics["grad_norm"] = sum(finite) / len(finite)
    if critic_grad_norms:
        metrics["critic/grad_norm"] = sum(critic_grad_norms) / len(critic_grad_norms)
    return metrics


def _batch_metrics(batch: Batch, rewards: WeightedRewards, algo: Algorithm) -> dict[str, float]:
    mask = batch.response_mask
    adv_mask = mask if batch.advantages.ndim == 2 else torch.ones_like(batch.advantages)
    adv_mean = ops.masked_mean(batch.advantages, adv_mask)
    metrics = {
        "reward/mean": float(batch.scores.mean()),
        "reward/std": float(batch.scores.std()) if batch.size > 1 else 0.0,
        "accuracy": float(batch.correct.float().mean()),
        "response_len/mean": float(mask.sum(1).mean()),
        "response_len/clipped_frac": float((mask[:, -1] > 0).float().mean()),
        "advantages/mean": float(adv_mean),
        "advantages/std": float(ops.masked_var(batch.advantages, adv_mask).sqrt()),
    }
    if batch.values is not None:
        residual_var = ops.masked_var(batch.returns - batch.values, mask)
        metrics["value/mean"] = float(ops.masked_mean(batch.values, mask))
        metrics["returns/mean"] = float(ops.masked_mean(batch.returns, mask))
        # 1 − Var(R − V) / Var(R): 1 is a perfect critic, ≤ 0 no better than predicting the mean.
        metrics["value/explained_variance"] = float(
            1 - residual_var / ops.masked_var(batch.returns, mask).clamp(min=1e-8)
        )
    return metrics


def _sample_rows(batch: Batch, count: int) -> list[dict]:
    stride = max(1, batch.size // max(1, count))
    return [
        {
            "prompt": batch.prompts[i],
            "completion": batch.completions[i],
            "answer": batch.answers[i],
            "reward": float(batch.scores[i]),
        }
        for i in range(0, batch.size, stride)[:count]
    ]


def evaluate_and_log(s: Stages, step: int, label: str) -> dict[str, float]:
    if s.evaluator is None:
        return {}
    start = time.perf_counter()
    with s.policy.generation_context():
        results = s.evaluator(s.policy.unwrapped())
    results["time_s"] = time.perf_counter() - start
    s.logger.metrics({f"eval/{k}": v for k, v in results.items()}, step)
    s.logger.message(
        f"[bold]eval {label}:[/bold] accuracy {results['accuracy']:.3f}  reward {results['reward_mean']:.3f}  "
        f"({results['n_prompts']} held-out prompts, {results['time_s']:.1f}s)"
    )
    return results


class StopRequest:
    """SIGTERM or Ctrl-C ask the loop to stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some launchers): no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _engines(s: Stages) -> dict[str, Engine]:
    return {"policy": s.policy} | ({"critic": s.critic} if s.critic is not None else {})


def save_resumable(s: Stages, state: TrainState) -> Path:
    """A checkpoint every rank contributes to (weights, optimiser shards, its RNG); the main rank
    writes the loop state and makes it visible atomically."""
    tmp = begin_checkpoint(s.run_dir / "checkpoints", state.step, s.ranks.is_main)
    barrier()
    for name, engine in _engines(s).items():
        engine.save(tmp / name, s.tokenizer if name == "policy" else None)
    save_rng(tmp, s.ranks.rank)
    path = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if s.ranks.is_main:
        trainer_state = {
            "step": state.step, "kl_coef": state.kl_coef, "skipped_steps": state.skipped_steps,
            "consecutive_skips": state.consecutive_skips, "eval_before": state.eval_before,
            "sampler": s.sampler.state_dict(), "model_path": s.model_path, "has_critic": s.critic is not None,
            "world_size": s.ranks.world_size,
        }  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    barrier()
    if s.ranks.is_main:
        path = commit_checkpoint(tmp, s.schedule.keep_last)
    barrier()
    return path


def restore(s: Stages, folder: Path) -> TrainState:
    """Optimiser, schedule, sampler, RNG and loop state from a checkpoint (build loaded its weights)."""
    saved = read_trainer_state(folder)
    if saved["world_size"] != s.ranks.world_size:
        raise RlctlError(
            f"resume: {folder} was written by {saved['world_size']} processes; resume it with the same number "
            f"(this launch has {s.ranks.world_size})"
        )
    for name, engine in _engines(s).items():
        engine.load_training_state(folder / name)
    s.sampler.load_state_dict(saved["sampler"])
    load_rng(folder, s.ranks.rank)
    return TrainState(
        step=saved["step"], kl_coef=saved["kl_coef"], skipped_steps=saved["skipped_steps"],
        consecutive_skips=saved["consecutive_skips"], eval_before=saved["eval_before"],
    )  # fmt: skip


def export_final(s: Stages) -> Path:
    """``checkpoints/final``: the policy alone as an HF folder (weights gathered under ZeRO-3), atomically."""
    final = s.run_dir / "checkpoints" / "final"
    tmp = final.with_name("final.tmp")
    if s.ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    s.policy.save(tmp, s.tokenizer, training_state=False)
    barrier()
    if s.ranks.is_main:
        publish_folder(tmp, final)
    barrier()
    return final


def train(s: Stages) -> dict:
    """Evaluate, run the steps (checkpointing, stopping cleanly on SIGTERM/Ctrl-C), evaluate, save.

    Returns {"before", "after", "final_metrics", "wall_s", "stopped_by"}.
    """
    summary: dict = {"stopped_by": None}
    started = time.perf_counter()
    if s.resume_from is not None:
        state = restore(s, s.resume_from)
        s.logger.message(f"resumed from {s.resume_from} at step {state.step}")
    else:
        state = TrainState(step=0, kl_coef=s.algo.kl_coef)
        if s.evaluator is not None:
            state.eval_before = evaluate_and_log(s, 0, "before training")
    metrics: dict[str, float] = {}
    sched = s.schedule
    with StopRequest() as stop:
        while state.step < sched.steps:
            state.step += 1
            metrics = {"step": state.step, **mean_over_ranks(train_step(s, state))}
            s.logger.metrics(metrics, state.step)
            if state.consecutive_skips:
                s.logger.message(
                    f"[yellow]step {state.step}: the loss or gradient was not finite; the update was skipped "
                    f"({state.consecutive_skips} in a row, {state.skipped_steps} in all)"
                )
            if state.consecutive_skips >= sched.max_consecutive_skips:
                last = latest_checkpoint(s.run_dir)
                raise RlctlError(
                    f"stopping: {state.consecutive_skips} steps in a row had a non-finite loss or gradient "
                    f"(checkpoint.max_consecutive_skips={sched.max_consecutive_skips}); the last good checkpoint is "
                    f"{last if last is not None else 'none (no checkpoint was saved yet)'}"
                )
            if sched.eval_every and state.step % sched.eval_every == 0 and state.step != sched.steps:
                evaluate_and_log(s, state.step, f"at step {state.step}")
            if stop.signal_name is not None:
                path = save_resumable(s, state)
                summary["stopped_by"] = stop.signal_name
                s.logger.message(
                    f"[bold yellow]{stop.signal_name}: stopped after step {state.step} and saved {path}.[/]\n"
                    f"Resume with: {s.resume_command}"
                )
                break
            if sched.checkpoint_every and state.step % sched.checkpoint_every == 0 and state.step != sched.steps:
                save_resumable(s, state)
        else:
            save_resumable(s, state)  # the end is always resumable (e.g. to train for more steps)
    summary["before"] = state.eval_before
    if summary["stopped_by"] is None:
        if s.evaluator is not None:
            summary["after"] = evaluate_and_log(s, state.step, "after training")
            (s.run_dir / "eval.json").write_text(
                json.dumps({k: summary[k] for k in ("before", "after")}, indent=2) + "\n"
            )
        if sched.save_final:
            s.logger.message(f"saved the trained model to {export_final(s)}")
    summary["final_metrics"] = metrics
    summary["wall_s"] = time.perf_counter() - started
    s.logger.message(f"done in {summary['wall_s']:.0f}s; run folder: {s.run_dir}")
    return summary
