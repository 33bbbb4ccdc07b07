"""The RL loop. ``train_step`` reads top to bottom: sample, reward, score, advantages, optimise.
It never asks which algorithm it runs (``stages.algo`` answers every such question) and never
splits a batch itself (``optim.update`` owns the minibatch and micro-batch loops)."""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import torch

from rlctl.algos import AdvantageInputs, ops
from rlctl.batch import Batch, sample_rows, scored_batch_metrics
from rlctl.checkpoint import (
    StopRequest,
    TrainState,
    amend_trainer_state,
    export_model,
    last_good_checkpoint,
    latest_checkpoint,
    load_rng,
    read_trainer_state,
    write_checkpoint,
)
from rlctl.distributed import mean_over_ranks, sum_over_ranks
from rlctl.errors import RlctlError
from rlctl.evaluate import evaluate_and_log, overoptimisation_warning
from rlctl.logging import Timer, seconds_since_start
from rlctl.optim.scoring import response_logprobs, response_values, score_in_chunks
from rlctl.optim.update import minibatch_counts, minibatches, padding_fraction, update
from rlctl.sampling import check_environment, check_reward_failures, sample_and_score
from rlctl.stages import Stages


def train_step(s: Stages, state: TrainState) -> dict[str, float]:
    """One step of on-policy RL: P prompts × G completions -> ``layout.updates_per_step`` updates."""
    timer, algo = Timer(), s.algo

    # 1-2. Rollout and reward: P prompts × G completions, scored (more prompts if groups are filtered).
    batch, sampling_metrics, reward_results = sample_and_score(s, timer)
    check_reward_failures(s, state, reward_results)
    check_environment(s, state, batch)

    # 3. Score the samples without gradients: reference log-probs, the sampling policy's log-probs
    #    (whenever the step makes more than one update, or the KL sits in the reward), critic values.
    with timer("ref"):
        ref_logp = _logprobs(s, s.reference, batch) if s.reference is not None else None
        needs_old = algo.needs_old_logprobs(s.layout.updates_per_step)
        old_logp = _logprobs(s, s.policy.model, batch) if needs_old else None
        values = _values(s, s.critic.model, batch) if s.critic is not None else None
    batch = batch.with_(ref_logprobs=ref_logp, old_logprobs=old_logp, values=values)

    # 4. Advantages: per-token rewards (score on the last token or step rewards, minus β·KL if in the reward).
    token_rewards = algo.token_rewards(
        batch.scores, batch.response_mask, batch.step_rewards, old_logp, ref_logp, state.kl_coef, batch.length_penalty
    )
    advantages, returns = algo.advantages(
        AdvantageInputs(
            batch.scores,
            batch.response_mask,
            algo.group_size,
            token_rewards=token_rewards,
            values=values,
            sum_over_ranks=sum_over_ranks,
        )  # fmt: skip
    )
    batch = batch.with_(token_rewards=token_rewards, advantages=advantages, returns=returns)

    # 5. Optimise: num_iterations passes over shuffled minibatches (the policy waits out the critic warm-up).
    with timer("update"):
        update_metrics = _optimise(s, batch, state.kl_coef, train_policy=state.step > s.critic_warmup_steps)

    # 6. Health and the KL coefficient: count a skipped (non-finite) update; adapt β to the measured KL.
    skipped = update_metrics.pop("optim/skipped_updates") > 0
    state.skipped_steps += skipped
    state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
    kl_coef_used = state.kl_coef
    if "kl" in update_metrics and not skipped:  # β must stay the same on every rank: adapt to the mean KL
        measured = mean_over_ranks({"kl": update_metrics["kl"]})["kl"]
        state.kl_coef = algo.next_kl_coef(state.kl_coef, measured, batch.size * s.ranks.world_size)

    metrics = {
        **scored_batch_metrics(batch),
        **sampling_metrics,
        **update_metrics,
        "kl_coef": kl_coef_used,
        **({"lr": s.policy.lr} if s.policy.lr is not None else {}),  # TRPO's policy has none
        "health/skipped_steps": float(state.skipped_steps),
        **timer.seconds,
    }
    metrics["memory/peak_gib"] = peak_memory_gib()
    metrics["time/step_s"] = sum(timer.seconds.values())
    metrics["throughput/tokens_per_s"] = float(batch.attention_mask.sum()) / metrics["time/step_s"]
    if s.sample_every and (state.step - 1) % s.sample_every == 0:
        s.logger.samples(sample_rows(batch, s.samples_shown), state.step)
    return metrics


def peak_memory_gib() -> float:
    """This process's peak so far: GPU memory allocated by torch, or on CPU the resident set (what
    the memory plan predicts)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _logprobs(s: Stages, model, batch: Batch) -> torch.Tensor:
    def logp(m, ids, mask, length):
        return response_logprobs(m, ids, mask, length, s.sampling.temperature, share_prompts=s.layout.share_prompts)[0]

    return score_in_chunks(logp, model, batch, s.layout.micro_batch_size, s.policy.autocast,
                           s.layout.max_tokens_per_micro_batch)  # fmt: skip


def _values(s: Stages, critic, batch: Batch) -> torch.Tensor:
    def values(m, ids, mask, length):
        return response_values(m, ids, mask, length, share_prompts=s.layout.share_prompts)

    return score_in_chunks(values, critic, batch, s.layout.micro_batch_size, s.critic.autocast,
                           s.layout.max_tokens_per_micro_batch)  # fmt: skip


def _optimise(s: Stages, batch: Batch, kl_coef: float, train_policy: bool) -> dict[str, float]:
    """``layout.updates_per_step`` updates of the policy (and of the critic, on the same minibatches).
    Each minibatch's aggregation denominators are counted once, over all its rows on all ranks."""
    algo, micro_size, max_tokens = s.algo, s.layout.micro_batch_size, s.layout.max_tokens_per_micro_batch

    def policy_loss(micro: Batch, totals: ops.AggregationTotals):
        with s.policy.autocast():
            logp, entropy = response_logprobs(
                s.policy.model, micro.input_ids, micro.attention_mask, micro.response_length,
                s.sampling.temperature, with_entropy=True, entropy_grad=algo.entropy_needs_grad,
                share_prompts=s.layout.share_prompts,
            )  # fmt: skip
        # Without stored log-probs this is the step's only update: the sampling policy is this one.
        old = micro.old_logprobs if micro.old_logprobs is not None else logp.detach()
        # The trainer's and the rollout engine's log-probs of the sampling weights: their gap, and its correction.
        is_weights, mismatch = s.correction.weights(old, micro.rollout_logprobs, micro.response_mask)
        loss, stats = algo.loss(
            logp, old, micro.advantages, micro.response_mask, micro.ref_logprobs, entropy, kl_coef, totals, is_weights
        )
        return loss, {"loss/total": loss.detach(), **stats, **mismatch}

    def critic_loss(micro: Batch, totals: ops.AggregationTotals):
        with s.critic.autocast():
            values = response_values(s.critic.model, micro.input_ids, micro.attention_mask, micro.response_length,
                                     share_prompts=s.layout.share_prompts)  # fmt: skip
        return algo.critic_loss(values, micro.values, micro.returns, micro.response_mask, totals)

    sums: dict[str, float] = {}
    grad_norms, critic_grad_norms = [], []
    for minibatch in minibatches(batch, s.layout):
        totals = algo.totals(*minibatch_counts(minibatch.response_mask))
        stats: dict[str, float] = {}
        if train_policy:
            norm, stats = s.policy_update(
                s.policy, minibatch, micro_size, partial(policy_loss, totals=totals), max_tokens
            )
            grad_norms.append(norm)
        if s.critic is not None:
            norm, critic_stats = update(
                s.critic, minibatch, micro_size, partial(critic_loss, totals=totals), max_tokens
            )
            critic_grad_norms.append(norm)
            stats.update(critic_stats)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
    metrics = {key: value / s.layout.updates_per_step for key, value in sums.items()}  # mean over updates
    # Padding in the forward passes: with fixed micro-batches at the batch's width, and as trained.
    metrics["batch/padding_frac_fixed"], metrics["batch/padding_frac"] = padding_fraction(batch, micro_size, max_tokens)
    finite = [g for g in grad_norms if math.isfinite(g)]
    metrics["optim/updates"] = float(len(finite))
    metrics["optim/skipped_updates"] = float(len(grad_norms) - len(finite))
    if finite:
        metrics["grad_norm"] = sum(finite) / len(finite)
    if critic_grad_norms:
        metrics["critic/grad_norm"] = sum(critic_grad_norms) / len(critic_grad_norms)
    return metrics


def _engines(s: Stages) -> dict:
    return {"policy": s.policy} | ({"critic": s.critic} if s.critic is not None else {})


def save_resumable(s: Stages, state: TrainState) -> Path:
    """The RL run's checkpoint: the policy (and critic), and the loop state."""
    trainer_state = {
        "step": state.step, "kl_coef": state.kl_coef, "skipped_steps": state.skipped_steps,
        "consecutive_skips": state.consecutive_skips, "eval_before": state.eval_before,
        "consecutive_reward_failures": state.consecutive_reward_failures, "evaluations": state.evaluations,
        "consecutive_tool_failures": state.consecutive_tool_failures,
        "gold_warned": state.gold_warned, "best": state.best, "sampler": s.sampler.state_dict(),
        "rewards": s.rewards.state_dict(), "has_critic": s.critic is not None, "world_size": s.ranks.world_size,
        "config": s.config,
    }  # fmt: skip
    return write_checkpoint(s.run_dir, state.step, _engines(s), s.tokenizer, s.ranks, s.checkpoints.keep_last,
                            trainer_state)  # fmt: skip


def restore(s: Stages, folder: Path) -> TrainState:
    """Optimiser, schedule, sampler, RNG and loop state from a checkpoint (build loaded its weights)."""
    saved = read_trainer_state(folder)  # build checked that it belongs to this run (check_resumable)
    for name, engine in _engines(s).items():
        engine.load_training_state(folder / name)
    s.sampler.load_state_dict(saved["sampler"])
    s.rewards.load_state_dict(saved.get("rewards", {}))
    load_rng(folder, s.ranks.rank)
    return TrainState(
        step=saved["step"], kl_coef=saved["kl_coef"], skipped_steps=saved["skipped_steps"],
        consecutive_skips=saved["consecutive_skips"], eval_before=saved["eval_before"],
        consecutive_reward_failures=saved["consecutive_reward_failures"], evaluations=saved.get("evaluations", []),
        gold_warned=saved.get("gold_warned", False), best=saved.get("best"),
        consecutive_tool_failures=saved.get("consecutive_tool_failures", 0),
    )  # fmt: skip


def evaluate(s: Stages, state: TrainState, label: str) -> dict:
    """A held-out evaluation, then what it decides: the over-optimisation warning (the trained reward up,
    eval.gold not, for eval.gold_patience evaluations since its best) and checkpoints/best (checkpoint.keep_best)."""
    results = evaluate_and_log(s.evaluator, s.policy, s.logger, state.step, label)
    if not results or "error" in results:
        return results
    state.evaluations.append({"step": state.step, "reward": results["reward_mean"], "gold": results.get("gold_mean")})
    warning = overoptimisation_warning(state.evaluations, s.gold_patience, getattr(s.evaluator, "gold_name", "gold"))
    if warning and not state.gold_warned:
        state.gold_warned = True
        s.logger.message(f"[bold yellow]warning: {warning}")
        s.logger.metrics({"eval/overoptimisation_warning": 1.0}, state.step)
    if s.keep_best != "none":
        key = "gold_mean" if s.keep_best == "gold" else "reward_mean"
        value = mean_over_ranks({key: results[key]})[key]  # one decision on every rank: the export is collective
        if state.best is None or value > state.best["value"]:
            state.best = {"step": state.step, "by": key, "value": value, "reward_mean": results["reward_mean"],
                          "gold_mean": results.get("gold_mean")}  # fmt: skip
            best = export_model(s.run_dir, s.policy, s.tokenizer, s.ranks, name="best")
            if s.ranks.is_main:
                (best / "best.json").write_text(json.dumps(state.best, indent=2) + "\n")
            s.logger.message(f"{best}: the policy of step {state.step} (held-out {key} {value:.3f}, the best so far)")
    return results


def export_final(s: Stages) -> Path:
    """``checkpoints/final``: the policy alone as an HF folder."""
    return export_model(s.run_dir, s.policy, s.tokenizer, s.ranks)


def train(s: Stages) -> dict:
    """Evaluate, run the steps (checkpointing, stopping cleanly on SIGTERM/Ctrl-C), evaluate, save.

    Returns {"before", "after", "final_metrics", "wall_s", "stopped_by"}.
    """
    summary: dict = {"stopped_by": None}
    started = time.perf_counter()
    if s.env_description:
        s.logger.message(s.env_description)
    s.logger.message(s.layout.describe(s.algo.update_name))
    if s.memory_plan:
        s.logger.message(s.memory_plan)
    if s.resume_from is not None:
        state = restore(s, s.resume_from)
        resumed_at = state.step
        s.logger.message(f"resumed from {s.resume_from} at step {state.step}")
        if state.step >= s.steps:
            s.logger.message(
                f"this run already finished its {state.step} steps; pass steps=N (> {state.step}) to train on"
            )
    else:
        state, resumed_at = TrainState(step=0, kl_coef=s.algo.kl_coef), None
        if s.evaluator is not None:
            state.eval_before = evaluate(s, state, "before training")
    metrics: dict[str, float] = {}
    policy = s.checkpoints
    with StopRequest(acknowledge=lambda line: s.logger.message(f"[yellow]{line}")) as stop:
        while state.step < s.steps:
            state.step += 1
            metrics = {"step": state.step, **mean_over_ranks(train_step(s, state))}
            s.logger.metrics(metrics, state.step)
            if state.consecutive_skips:
                s.logger.message(
                    f"[yellow]step {state.step}: the loss or gradient was not finite; the update was skipped "
                    f"({state.consecutive_skips} in a row, {state.skipped_steps} in all)"
                )
            if state.consecutive_skips >= policy.max_consecutive_skips:
                raise RlctlError(
                    f"stopping: {state.consecutive_skips} steps in a row had a non-finite loss or gradient "
                    f"(checkpoint.max_consecutive_skips={policy.max_consecutive_skips}); the last good checkpoint is "
                    f"{last_good_checkpoint(s.run_dir)}"
                )
            if s.eval_every and state.step % s.eval_every == 0 and state.step != s.steps:
                evaluate(s, state, f"at step {state.step}")
            if stop.signal_name is not None:
                path = save_resumable(s, state)
                summary["stopped_by"] = stop.signal_name
                s.logger.message(
                    f"[bold yellow]{stop.signal_name}: stopped after step {state.step} and saved {path}.[/]\n"
                    f"Resume with: {s.resume_command}"
                )
                break
            if policy.every and state.step % policy.every == 0 and state.step != s.steps:
                save_resumable(s, state)
        else:
            if state.step != resumed_at:
                save_resumable(s, state)  # the end is always resumable (e.g. to train for more steps)
    summary["before"] = state.eval_before
    if summary["stopped_by"] is None:
        nothing_trained = s.resume_from is not None and state.step == resumed_at  # a finished run, resumed
        try:
            if nothing_trained and (s.run_dir / "eval.json").exists():  # its evaluation stands
                summary.update(json.loads((s.run_dir / "eval.json").read_text()))
            elif s.evaluator is not None:
                summary["after"] = evaluate(s, state, "after training")
                summary["best"] = state.best
                last = latest_checkpoint(s.run_dir)
                if s.ranks.is_main and last is not None:  # so a resumed run keeps what the evaluation decided
                    amend_trainer_state(last, {"evaluations": state.evaluations, "gold_warned": state.gold_warned,
                                               "best": state.best})  # fmt: skip
                (s.run_dir / "eval.json").write_text(
                    json.dumps({k: summary[k] for k in ("before", "after", "best") if summary[k] is not None}, indent=2)
                    + "\n"
                )
            if s.save_final and not (nothing_trained and (s.run_dir / "checkpoints" / "final").is_dir()):
                s.logger.message(f"saved the trained model to {export_final(s)}")
        except KeyboardInterrupt:  # training is done and saved: the rest can be redone by resuming
            summary["stopped_by"] = "SIGINT"
            s.logger.message(
                f"[bold yellow]interrupted after training: step {state.step} is saved in "
                f"{latest_checkpoint(s.run_dir)}; the final evaluation and export did not finish.[/]\n"
                f"Resume with: {s.resume_command}"
            )
    summary["final_metrics"] = metrics
    summary["wall_s"] = time.perf_counter() - started
    s.logger.message(f"done: {summary['wall_s']:.0f}s in the loop, {seconds_since_start():.0f}s wall time with start-up; "
                         f"run folder: {s.run_dir}")  # fmt: skip
    return summary
