"""Steps 1-2 of a training step: the rollout and reward stages. Sample P prompts' groups, score
them, and with dynamic sampling (DAPO) keep sampling until P groups carry signal; say which reward
term failed, and stop a run whose reward fails on everything."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from rich.markup import escape

from rlctl.algos import shaping
from rlctl.batch import Batch, concat, reward_chats
from rlctl.checkpoint import TrainState, last_good_checkpoint
from rlctl.distributed import any_rank, sum_over_ranks
from rlctl.errors import RlctlError
from rlctl.logging import Timer
from rlctl.rollout.hf import step_rewards_to_tokens

if TYPE_CHECKING:
    from rlctl.stages import Stages


def sample_and_score(s: Stages, timer: Timer) -> tuple[Batch, dict[str, float], list]:
    """Generate and score P prompts' groups; with dynamic sampling keep only groups whose rewards
    differ and sample more prompts until P such groups are found or the retries run out.
    Returns the batch, its metrics and the reward calls' results (for their failures)."""
    algo, prompts_per_step = s.algo, s.layout.prompts_per_step
    kept: list[Batch] = []
    n_kept = n_sampled = 0
    term_sums: dict[str, float] = {}
    errors_before = s.rewards.errors
    results = []
    for _attempt in range(1 + (algo.sampling_retries if algo.dynamic_sampling else 0)):
        with timer("weight_sync"):  # the vllm engine gets the policy's weights if they changed (hf: nothing)
            s.rollout.load_weights_of(s.policy)
        with timer("rollout"):
            # one global draw of P × world prompts; each rank takes its own P (all G samples stay together)
            everyone = s.sampler.next_batch()
            picked = everyone[s.ranks.rank * prompts_per_step : (s.ranks.rank + 1) * prompts_per_step]
            batch = s.rollout.generate(
                s.policy,
                [s.train_prompts.token_ids[i] for i in picked],
                [s.train_prompts.examples[i].answer for i in picked],
                algo.group_size,
                prompt_texts=[_display(s.train_prompts.examples[i].prompt) for i in picked],
                conversations=[s.train_prompts.conversations[i] for i in picked],
            )
        with timer("reward"):
            chats = reward_chats(batch, [s.train_prompts.conversations[i] for i in picked], algo.group_size)
            result = s.rewards(batch.completions, batch.answers, chats)
            results.append(result)
            penalty = algo.length_penalty(batch.response_mask.sum(dim=1))
            # An environment's per-turn rewards add to the final answer's score (GRPO's groups compare totals).
            turns = batch.turn_rewards.sum(dim=1) if batch.turn_rewards is not None else 0.0
            batch = batch.with_(scores=result.scores + turns + penalty, length_penalty=penalty, correct=result.correct)
        n_sampled += len(picked)
        for name, values in result.per_term.items():  # unshaped, over everything sampled
            term_sums[name] = term_sums.get(name, 0.0) + float(values.sum())
        batch = _with_steps(s, batch, result.steps, result.scores)
        if not algo.dynamic_sampling:
            metrics = {f"reward/{k}": v / batch.size for k, v in term_sums.items()}
            return batch, {**metrics, "reward/errors": float(s.rewards.errors - errors_before)}, results
        keep = shaping.groups_with_signal(batch.scores, algo.group_size).repeat_interleave(algo.group_size)
        if keep.any():
            kept.append(batch.rows(torch.nonzero(keep).squeeze(1)))
            n_kept += int(keep.sum()) // algo.group_size
        uniform = batch.rows(torch.nonzero(~keep).squeeze(1))
        if not any_rank(n_kept < prompts_per_step):  # ranks retry together: rollouts are collective under ZeRO-3
            break
    metrics = {"sampling/prompts_sampled": float(n_sampled), "sampling/groups_kept": float(n_kept)}
    metrics.update({f"reward/{k}": v / (n_sampled * algo.group_size) for k, v in term_sums.items()})
    metrics["reward/errors"] = float(s.rewards.errors - errors_before)
    # Too few groups with signal: top up with groups from the last rollout (their advantages are 0),
    # so every step, and every rank, trains on the same number of samples.
    batch = concat([b for b in (*kept, uniform) if b.size > 0], s.tokenizer.pad_token_id)
    return batch.rows(torch.arange(s.layout.samples_per_step)), metrics, results


def check_reward_failures(s: Stages, state: TrainState, results: list) -> None:
    """Say which reward term failed and why; stop when a term has failed on every sample of
    ``max_failed_reward_steps`` steps in a row (the run would train on fallback scores alone)."""
    failed: dict[str, tuple[int, str]] = {}  # over every rollout of the step (dynamic sampling may make several)
    for result in results:
        for name, (count, first) in result.failures.items():
            total, first_seen = failed.get(name, (0, first))
            failed[name] = (total + count, first_seen)
    for name, (count, first) in failed.items():
        s.logger.message(
            f"[yellow]step {state.step}: reward {escape(repr(name))} failed on {count} samples: {escape(first)}"
        )
    dead = next((name for r in results if (name := r.fully_failed())), None)
    every_rank_dead = not any_rank(dead is None)  # ranks decide together
    state.consecutive_reward_failures = state.consecutive_reward_failures + 1 if every_rank_dead else 0
    if state.consecutive_reward_failures >= s.max_failed_reward_steps:
        first = failed[dead][1] if dead else "(on another rank)"
        raise RlctlError(
            f"stopping: reward {dead!r} failed on every sample for {state.consecutive_reward_failures} steps in a row "
            f"(reward.max_failed_steps={s.max_failed_reward_steps}): {first}; the last good checkpoint is "
            f"{last_good_checkpoint(s.run_dir)}"
        )


def check_environment(s: Stages, state: TrainState, batch: Batch) -> None:
    """Say what an environment raised (those episodes ended there, flagged truncated); stop when every
    tool call of ``max_failed_reward_steps`` steps in a row failed, on every rank (timeouts, a broken
    tool: the policy would learn from error messages alone)."""
    if batch.env_stats is None:
        return
    errors = [e for e in batch.env_errors if e]
    if errors:
        s.logger.message(f"[yellow]step {state.step}: the environment failed on {len(errors)} of {batch.size} "
                         f"episodes (each ended there, flagged truncated): {escape(errors[0])}")  # fmt: skip
    calls, failed = sum_over_ranks(
        [float(batch.env_stats["tool_calls"].sum()), float(batch.env_stats["tool_errors"].sum())]
    )
    state.consecutive_tool_failures = state.consecutive_tool_failures + 1 if calls > 0 and failed == calls else 0
    if state.consecutive_tool_failures >= s.max_failed_reward_steps:
        raise RlctlError(
            f"stopping: every tool call failed for {state.consecutive_tool_failures} steps in a row "
            f"(reward.max_failed_steps={s.max_failed_reward_steps}); the samples tables show the errors the policy read; "
            f"the last good checkpoint is {last_good_checkpoint(s.run_dir)}"
        )


def _with_steps(s: Stages, batch: Batch, steps, answer_scores: torch.Tensor) -> Batch:
    """Per-token rewards when the score is not one number on the last token: an environment's
    per-turn rewards on their turns' last tokens with the final answer's score on the last trained
    token, or a reward term's step rewards at their offsets in the completion. In a multi-turn
    episode a term's step rewards count as one score on the last token (their offsets are in the
    final reply, whose tokens the loop does not map back)."""
    if batch.turn_rewards is not None:
        rewards = batch.turn_rewards.clone()
        last = shaping.last_token_index(batch.response_mask)
        rewards[torch.arange(batch.size), last] += answer_scores.to(rewards.dtype)
        return batch.with_(step_rewards=rewards)
    if steps is None or batch.conversations is not None:
        return batch
    responses = batch.input_ids[:, -batch.response_length :]
    return batch.with_(step_rewards=step_rewards_to_tokens(s.tokenizer, responses, batch.response_mask, steps))


def _display(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]
