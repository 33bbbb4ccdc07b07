"""Held-out evaluation: accuracy, mean reward and pass@k over n samples per prompt, and the gold
reward beside the trained one (``eval.gold``), watched for over-optimisation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from rich.markup import escape

from rlctl.batch import reward_chats
from rlctl.data.prompts import PromptSet
from rlctl.errors import RlctlError, check_fields
from rlctl.rewards import WeightedRewards
from rlctl.rollout import HFRollout
from rlctl.rollout.vllm import VLLMRollout


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 − C(n−c, k) / C(n, k) for c correct out of n samples."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class EvalSpec:
    """The ``eval`` config group, filled by field name."""

    enabled: bool  # evaluate before training, every `every` steps, and after
    every: int  # steps between evaluations during training (0 = before and after only)
    n_samples: int  # completions per held-out prompt
    temperature: float  # 0 = greedy
    pass_k: list[int]  # report pass@k for each k
    batch_size: int  # prompts per generation call
    gold: str | None  # a reward scored on held-out answers only (a term name or file.py:function)
    gold_patience: int  # evaluations since the best gold, each with a higher trained reward, before the warning

    def __post_init__(self) -> None:
        checks = (("every", self.every >= 0, "must be ≥ 0"), ("n_samples", self.n_samples >= 1, "must be ≥ 1"),
                  ("temperature", self.temperature >= 0, "must be ≥ 0 (0 = greedy)"),
                  ("batch_size", self.batch_size >= 1, "must be ≥ 1"),
                  ("gold_patience", self.gold_patience >= 1, "must be ≥ 1"))  # fmt: skip
        check_fields(self, checks)
        bad = [k for k in self.pass_k if not 1 <= k <= self.n_samples]
        if bad:
            raise ValueError(f"pass_k: every k must be between 1 and eval.n_samples={self.n_samples}, got {bad}")


class HeldOutRewardFailed(RlctlError):
    """A reward term failed on every held-out sample: the evaluation has no score to report."""


def failure_note(failures: dict[str, tuple[int, str]], samples: int) -> str:
    """ "reward 'r.py:score' failed on 3 of 8 held-out samples (scored reward.fallback): ValueError: boom"."""
    return "; ".join(f"reward {name!r} failed on {count} of {samples} held-out samples (scored reward.fallback): {first}"
                     for name, (count, first) in failures.items())  # fmt: skip


class Evaluator:
    def __init__(
        self,
        prompts: PromptSet,
        rollout: HFRollout | VLLMRollout,
        rewards: WeightedRewards,
        n_samples: int,
        pass_k: list[int],
        gold: WeightedRewards | None = None,
    ):
        bad = [k for k in pass_k if not 1 <= k <= n_samples]
        if bad:
            raise RlctlError(f"eval.pass_k: every k must be between 1 and eval.n_samples={n_samples}, got {bad}")
        self.prompts, self.rollout, self.rewards = prompts, rollout, rewards
        self.n_samples, self.pass_k = n_samples, pass_k
        self.gold = gold  # eval.gold: one term, scored beside the trained reward and never trained on
        self.gold_name = gold.terms[0].name if gold is not None else ""
        self.last_failures = ""  # the reward failures of the last call, in words ("" when none)

    def __call__(self, policy) -> dict[str, float]:
        """{"accuracy", "reward_mean", "pass@k"..., "n_prompts", "response_len_mean", "reward_errors"} over the
        held-out set. Reward failures are counted in ``reward_errors`` and described in ``last_failures``;
        when a term failed on every sample there is no result: :class:`HeldOutRewardFailed`."""
        if len(self.prompts) == 0:
            return {}
        batch = self.rollout.generate(
            policy,
            self.prompts.token_ids,
            [e.answer for e in self.prompts.examples],
            self.n_samples,
            conversations=self.prompts.conversations,
        )
        chats = reward_chats(batch, self.prompts.conversations, self.n_samples)
        with self.rewards.evaluating():
            result = self.rewards(batch.completions, batch.answers, chats)
        self.last_failures = failure_note(result.failures, len(batch.completions))
        dead = result.fully_failed()
        if dead is not None:
            raise HeldOutRewardFailed(
                f"reward {dead!r} failed on every one of the {len(batch.completions)} held-out samples, so there is no "
                f"held-out score: {result.failures[dead][1]}"
            )
        correct_per_prompt = result.correct.view(-1, self.n_samples).sum(dim=1).tolist()
        metrics = {
            "accuracy": float(result.correct.float().mean()),
            "reward_mean": float(result.scores.mean()),
            "response_len_mean": float(batch.response_mask.sum(dim=1).mean()),
            "n_prompts": len(self.prompts),
            "reward_errors": float(sum(count for count, _ in result.failures.values())),
        }
        if batch.env_stats is not None:  # multi-turn: turns, tool calls and errors, truncation, per trajectory
            metrics.update({f"env_{name}": float(v.float().mean()) for name, v in batch.env_stats.items()})
        for k in self.pass_k:
            metrics[f"pass@{k}"] = float(
                torch.tensor([pass_at_k(self.n_samples, c, k) for c in correct_per_prompt]).mean()
            )
        if self.gold is not None:
            with self.gold.evaluating():
                gold = self.gold(batch.completions, batch.answers, chats)
            if gold.fully_failed() is not None:
                raise HeldOutRewardFailed(f"eval.gold={self.gold_name!r} failed on every one of the "
                                          f"{len(batch.completions)} held-out samples: {next(iter(gold.failures.values()))[1]}")  # fmt: skip
            note = failure_note(gold.failures, len(batch.completions))
            self.last_failures = "; ".join(x for x in (self.last_failures, note and f"eval.gold: {note}") if x)
            metrics["gold_mean"] = float(gold.scores.mean())
        return metrics


def evaluate_and_log(evaluator: Evaluator | None, policy, logger, step: int, label: str) -> dict:
    """Evaluate the policy engine's model (gathered under ZeRO-3), log the results as ``eval/*``.
    Reward failures are said in the same line; a term that failed on every sample leaves no result
    ({"error": ...}, never an accuracy or a reward made of fallback scores)."""
    if evaluator is None:
        return {}
    start = time.perf_counter()
    try:
        results = evaluator(policy)
    except HeldOutRewardFailed as err:
        logger.message(f"[bold red]eval {label}: no result:[/bold red] {escape(str(err))}")
        logger.metrics({"eval/reward_failed": 1.0}, step)
        return {"error": str(err)}
    results["time_s"] = time.perf_counter() - start
    logger.metrics({f"eval/{k}": v for k, v in results.items()}, step)
    failures = getattr(evaluator, "last_failures", "")
    meaning = getattr(getattr(evaluator, "rewards", None), "accuracy_meaning", "")
    logger.message(
        f"[bold]eval {label}:[/bold] accuracy {results['accuracy']:.3f}  reward {results['reward_mean']:.3f}  "
        + (f"gold {escape(evaluator.gold_name)} {results['gold_mean']:.3f}  " if "gold_mean" in results else "")
        + f"({results['n_prompts']} held-out prompts, {results['time_s']:.1f}s)"
        + (f"\n[yellow]  {escape(failures)}[/yellow]" if failures else "")
    )
    if step == 0 and meaning:
        logger.message(f"  accuracy counts an answer as correct when {escape(meaning)}")
    return results


def overoptimisation_warning(evaluations: list[dict], patience: int, gold_name: str) -> str | None:
    """One line when the best gold reward so far is at least ``patience`` evaluations old and each
    of the last ``patience`` evaluations scored a higher trained reward than that best one did (the
    trained reward rose, the gold did not), else None. ``evaluations``: [{"step", "reward", "gold"}]
    in order (held-out means; gold None = no eval.gold). The earliest of equal golds is the best, so
    a gold that stays flat while the reward climbs counts too."""
    scored = [e for e in evaluations if e.get("gold") is not None]
    if not scored:
        return None
    best = max(range(len(scored)), key=lambda i: (scored[i]["gold"], -i))
    since, recent, end = scored[best], scored[-patience:], scored[-1]
    if len(scored) - 1 - best < patience or not all(e["reward"] > since["reward"] for e in recent):
        return None
    return (
        f"the trained reward rose and the gold reward ({gold_name}) did not for {patience} evaluations since its best "
        f"at step {since['step']}: reward {since['reward']:.3f} → {end['reward']:.3f} ({end['reward'] - since['reward']:+.3f}), "
        f"gold {since['gold']:.3f} → {end['gold']:.3f} ({end['gold'] - since['gold']:+.3f}); the policy may be "
        "fooling its reward (over-optimisation): look at its samples; checkpoint.keep_best=gold keeps the best policy by gold"
    )
