"""The training loop. ``train_step`` reads top to bottom: sample, score, reference, advantages,
optimise. It never asks which algorithm it runs; ``stages.algo`` answers every such question."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rlctl.algos import AdvantageInputs, Algorithm, ops
from rlctl.batch import Batch
from rlctl.checkpoint import save_hf_folder
from rlctl.data import PromptSampler, PromptSet
from rlctl.engine import Engine
from rlctl.evaluate import Evaluator
from rlctl.logging import Loggers
from rlctl.rewards import WeightedRewards
from rlctl.rollout import HFRollout
from rlctl.scoring import response_logprobs


@dataclass(frozen=True)
class Schedule:
    """Plain values the loop needs, read from the config once by ``build``."""

    steps: int
    prompts_per_step: int
    num_iterations: int
    minibatch_size: int  # samples per optimiser update
    micro_batch_size: int  # samples per forward/backward
    temperature: float  # sampling temperature, also applied when scoring
    eval_every: int  # 0 = before and after only
    sample_every: int  # steps between sample tables (0 = never)
    samples_shown: int
    save_final: bool


@dataclass
class Stages:
    tokenizer: object
    policy: Engine
    reference: torch.nn.Module | None  # frozen; None when the algorithm's KL coefficient is 0
    rollout: HFRollout
    rewards: WeightedRewards
    algo: Algorithm
    train_prompts: PromptSet
    sampler: PromptSampler
    evaluator: Evaluator | None
    logger: Loggers
    schedule: Schedule
    run_dir: Path


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}_s"] = self.seconds.get(f"time/{name}_s", 0.0) + time.perf_counter() - start


def train_step(s: Stages, step: int) -> dict[str, float]:
    """One step of on-policy RL: P prompts × G completions -> one or more optimiser updates."""
    timer, algo, model = Timer(), s.algo, s.policy.model

    # 1. Rollout: sample G completions for each of P prompts from the current policy.
    with timer("rollout"):
        picked = s.sampler.next_batch()
        batch = s.rollout.generate(
            s.policy.unwrapped(),
            [s.train_prompts.token_ids[i] for i in picked],
            [s.train_prompts.examples[i].answer for i in picked],
            algo.group_size,
            prompt_texts=[_display(s.train_prompts.examples[i].prompt) for i in picked],
        )

    # 2. Reward: score every completion against its prompt's answer.
    with timer("reward"):
        result = s.rewards(batch.completions, batch.answers)
        batch = batch.with_(scores=result.scores, correct=result.correct)

    # 3. Reference (and, when samples are reused, old-policy) log-probs, without gradients.
    with timer("ref"), torch.no_grad():
        if s.reference is not None:
            batch = batch.with_(ref_logprobs=_logprobs_in_chunks(s, s.reference, batch))
        if s.schedule.num_iterations > 1:
            batch = batch.with_(old_logprobs=_logprobs_in_chunks(s, model, batch))

    # 4. Advantages from the scores (group baselines, whitening … as the algorithm says).
    batch = batch.with_(advantages=algo.advantages(AdvantageInputs(batch.scores, batch.response_mask, algo.group_size)))

    # 5. Optimise: num_iterations passes over shuffled minibatches, micro-batched for memory.
    with timer("update"):
        update_stats = _optimise(s, batch)

    metrics = {
        "reward/mean": float(batch.scores.mean()),
        "reward/std": float(batch.scores.std()) if batch.scores.numel() > 1 else 0.0,
        "accuracy": float(batch.correct.float().mean()),
        "response_len/mean": float(batch.response_mask.sum(1).mean()),
        "response_len/clipped_frac": float((batch.response_mask[:, -1] > 0).float().mean()),
        "advantages/mean": float(batch.advantages.mean()),
        "advantages/std": float(batch.advantages.std()),
        **{f"reward/{name}": float(v.mean()) for name, v in result.per_term.items()},
        **update_stats,
        "lr": s.policy.lr,
        **timer.seconds,
    }
    metrics["time/step_s"] = sum(timer.seconds.values())
    metrics["throughput/tokens_per_s"] = float(batch.attention_mask.sum()) / metrics["time/step_s"]
    if s.schedule.sample_every and step % s.schedule.sample_every == 1 % s.schedule.sample_every:
        shown = range(0, len(batch.completions), max(1, len(batch.completions) // max(1, s.schedule.samples_shown)))
        rows = [{"prompt": batch.prompts[i], "completion": batch.completions[i], "answer": batch.answers[i],
                 "reward": float(batch.scores[i])} for i in list(shown)[: s.schedule.samples_shown]]  # fmt: skip
        s.logger.samples(rows, step)
    return metrics


def _display(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _logprobs_in_chunks(s: Stages, model, batch: Batch) -> torch.Tensor:
    chunks = []
    for start in range(0, batch.input_ids.shape[0], s.schedule.micro_batch_size):
        rows = slice(start, start + s.schedule.micro_batch_size)
        with s.policy.autocast():
            logp, _ = response_logprobs(
                model, batch.input_ids[rows], batch.attention_mask[rows], batch.response_length, s.schedule.temperature
            )
        chunks.append(logp)
    return torch.cat(chunks)


def _optimise(s: Stages, batch: Batch) -> dict[str, float]:
    n, sched = batch.input_ids.shape[0], s.schedule
    sums: dict[str, float] = {}
    counts = 0
    grad_norms = []
    for _ in range(sched.num_iterations):
        order = torch.randperm(n)
        for start in range(0, n, sched.minibatch_size):
            minibatch = batch.rows(order[start : start + sched.minibatch_size])
            for micro_start in range(0, minibatch.input_ids.shape[0], sched.micro_batch_size):
                micro = minibatch.rows(torch.arange(micro_start, min(micro_start + sched.micro_batch_size, minibatch.input_ids.shape[0])))
                weight = ops.micro_batch_weight(micro.response_mask, minibatch.response_mask, s.algo.loss_agg)
                with s.policy.autocast():
                    logp, entropy = response_logprobs(
                        s.policy.model, micro.input_ids, micro.attention_mask, micro.response_length,
                        sched.temperature, with_entropy=True, entropy_grad=s.algo.entropy_coef != 0,
                    )  # fmt: skip
                old = micro.old_logprobs if micro.old_logprobs is not None else logp.detach()
                loss, stats = s.algo.loss(logp, old, micro.advantages, micro.response_mask, micro.ref_logprobs, entropy)
                s.policy.backward(loss * weight)
                for key, value in {"loss/total": loss.detach(), **stats}.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * weight
                counts += weight
            grad_norms.append(s.policy.step())
    averaged = {key: value / max(counts, 1e-12) for key, value in sums.items()}
    averaged["grad_norm"] = sum(grad_norms) / len(grad_norms)
    averaged["optim/updates"] = len(grad_norms)
    return averaged


def evaluate_and_log(s: Stages, step: int, label: str) -> dict[str, float]:
    if s.evaluator is None:
        return {}
    start = time.perf_counter()
    results = s.evaluator(s.policy.unwrapped())
    results["time_s"] = time.perf_counter() - start
    s.logger.metrics({f"eval/{k}": v for k, v in results.items()}, step)
    s.logger.message(
        f"[bold]eval ({label})[/bold] accuracy {results['accuracy']:.3f}  reward {results['reward_mean']:.3f}  "
        f"on {results['n_prompts']} held-out prompts  ({results['time_s']:.1f}s)"
    )
    return results


def train(s: Stages) -> dict:
    """Evaluate, run every step, evaluate again, save; returns {"before", "after", "final_metrics"}."""
    summary: dict = {}
    started = time.perf_counter()
    if s.evaluator is not None:
        summary["before"] = evaluate_and_log(s, 0, "before training")
    metrics: dict[str, float] = {}
    for step in range(1, s.schedule.steps + 1):
        metrics = {"step": step, **train_step(s, step)}
        s.logger.metrics(metrics, step)
        if s.schedule.eval_every and step % s.schedule.eval_every == 0 and step != s.schedule.steps:
            evaluate_and_log(s, step, f"step {step}")
    if s.evaluator is not None:
        summary["after"] = evaluate_and_log(s, s.schedule.steps, "after training")
        (s.run_dir / "eval.json").write_text(json.dumps({k: summary[k] for k in ("before", "after")}, indent=2) + "\n")
    if s.schedule.save_final:
        final = save_hf_folder(s.policy.unwrapped(), s.tokenizer, s.run_dir / "checkpoints" / "final")
        s.logger.message(f"saved the trained model to {final}")
    summary["final_metrics"] = metrics
    summary["wall_s"] = time.perf_counter() - started
    s.logger.message(f"done in {summary['wall_s']:.0f}s; run folder: {s.run_dir}")
    return summary
