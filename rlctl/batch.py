"""The typed batch that flows through a step. Each stage returns a copy with more fields filled."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlctl.algos import ops


@dataclass(frozen=True)
class Batch:
    """B = P prompts × G completions, in group order; L = prompt + response length; T = response length.

    input_ids [B, L] holds the left-padded prompt then the right-padded response;
    response_mask [B, T] is 1 on generated tokens up to and including EOS: the tokens that are trained.
    A multi-turn response also holds observations (tool results): attended (attention_mask 1) but
    never trained (response_mask 0), so the attended response of a row may be longer than its mask.
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    response_mask: torch.Tensor  # [B, T] float
    group_ids: torch.Tensor  # [B] long: index of the prompt in this batch
    prompts: list[str]  # [B] decoded prompt text (for sample tables)
    completions: list[str]  # [B] decoded response text, special tokens stripped
    answers: list[str]  # [B] reference answers
    scores: torch.Tensor | None = None  # [B] sequence reward
    correct: torch.Tensor | None = None  # [B] bool
    length_penalty: torch.Tensor | None = None  # [B] the part of ``scores`` that punishes length (DAPO overlong)
    rollout_logprobs: torch.Tensor | None = None  # [B, T] what the rollout engine sampled with (vllm; hf: None)
    old_logprobs: torch.Tensor | None = None  # [B, T] from the policy that sampled (None: same as current)
    ref_logprobs: torch.Tensor | None = None  # [B, T] from the frozen reference
    step_rewards: torch.Tensor | None = None  # [B, T] process rewards on their tokens (None: one score per sequence)
    values: torch.Tensor | None = None  # [B, T] critic values before the update
    token_rewards: torch.Tensor | None = None  # [B, T] what the advantage estimator credits
    advantages: torch.Tensor | None = None  # [B] or [B, T]
    returns: torch.Tensor | None = None  # [B, T] critic targets
    turn_rewards: torch.Tensor | None = None  # [B, T] an environment's per-turn rewards on each turn's last token
    conversations: list[list[dict]] | None = None  # [B] multi-turn: every message of the episode
    env_stats: dict[str, torch.Tensor] | None = None  # multi-turn: name -> [B] per-trajectory counts
    env_errors: list[str] | None = None  # [B] multi-turn: what the environment raised ("" when nothing)

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def stat_weight(self) -> float:
        """What a micro-batch's per-token stats are weighted by when averaged: its valid tokens."""
        return float(self.response_mask.sum())

    def with_(self, **fields) -> Batch:
        return replace(self, **fields)

    def trimmed(self) -> Batch:
        """The same rows without the columns that are padding in every row: the prompts' common left
        padding and the response columns past the longest response. Positions follow the attention
        mask and padding is never attended to or trained on, so scores and losses are unchanged."""
        width = self.input_ids.shape[1]
        prompt_width = width - self.response_length
        attended = self.attention_mask[:, :prompt_width].any(dim=0).nonzero()
        first = int(attended[0]) if len(attended) else prompt_width
        keep = max(int(self.attention_mask[:, prompt_width:].sum(dim=1).max()) if self.size else 0, 1)
        if first == 0 and keep == self.response_length:
            return self
        picked = {}
        for name, value in self.__dict__.items():
            if name in ("input_ids", "attention_mask"):
                value = value[:, first : prompt_width + keep]
            elif isinstance(value, torch.Tensor) and value.ndim == 2:  # every [B, T] field
                value = value[:, :keep]
            picked[name] = value
        return Batch(**picked)

    def rows(self, index: torch.Tensor) -> Batch:
        """A sub-batch of the given rows (tensors sliced, lists picked)."""
        picked = {}
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                picked[name] = value[index]
            elif isinstance(value, list):
                picked[name] = [value[i] for i in index.tolist()]
            elif isinstance(value, dict):
                picked[name] = {k: v[index] for k, v in value.items()}
            else:
                picked[name] = value
        return Batch(**picked)


def concat(batches: list[Batch], pad_id: int) -> Batch:
    """Stack batches sampled separately: prompts re-left-padded, responses re-right-padded to common
    widths, group ids renumbered so groups stay distinct. Only rollout and reward fields are kept."""
    prompt_width = max(b.input_ids.shape[1] - b.response_length for b in batches)
    response_width = max(b.response_length for b in batches)
    parts: dict[str, list] = {
        k: []
        for k in (
            "input_ids",
            "attention_mask",
            "response_mask",
            "group_ids",
            "scores",
            "correct",
            "length_penalty",
            "step_rewards",
            "rollout_logprobs",
            "turn_rewards",
        )
    }
    offset = 0
    for b in batches:
        split = b.input_ids.shape[1] - b.response_length
        left, right = prompt_width - split, response_width - b.response_length
        pad = torch.nn.functional.pad
        parts["input_ids"].append(
            torch.cat(
                [
                    pad(b.input_ids[:, :split], (left, 0), value=pad_id),
                    pad(b.input_ids[:, split:], (0, right), value=pad_id),
                ],
                1,
            )
        )
        parts["attention_mask"].append(
            torch.cat([pad(b.attention_mask[:, :split], (left, 0)), pad(b.attention_mask[:, split:], (0, right))], 1)
        )
        parts["response_mask"].append(pad(b.response_mask, (0, right)))
        parts["step_rewards"].append(None if b.step_rewards is None else pad(b.step_rewards, (0, right)))
        for name in ("rollout_logprobs", "turn_rewards"):
            value = getattr(b, name)
            parts[name].append(None if value is None else pad(value, (0, right)))
        parts["group_ids"].append(b.group_ids - b.group_ids.min() + offset)
        offset = int(parts["group_ids"][-1].max()) + 1
        parts["scores"].append(b.scores)
        parts["correct"].append(b.correct)
        parts["length_penalty"].append(b.length_penalty)
    tensors = {k: (torch.cat(v) if all(t is not None for t in v) else None) for k, v in parts.items()}
    lists = {k: [x for b in batches for x in getattr(b, k)] for k in ("prompts", "completions", "answers")}
    for name in ("conversations", "env_errors"):
        given = [getattr(b, name) for b in batches]
        lists[name] = [x for v in given for x in v] if all(v is not None for v in given) else None
    stats = [b.env_stats for b in batches]
    env_stats = {k: torch.cat([s[k] for s in stats]) for k in stats[0]} if all(s is not None for s in stats) else None
    return Batch(**tensors, **lists, env_stats=env_stats)


def scored_batch_metrics(batch: Batch) -> dict[str, float]:
    """What a practitioner reads of a scored batch: rewards, accuracy, lengths, advantages, and for a
    critic its values and explained variance."""
    mask = batch.response_mask
    adv_mask = mask if batch.advantages.ndim == 2 else torch.ones_like(batch.advantages)
    metrics = {
        "reward/mean": float(batch.scores.mean()),
        "reward/std": float(batch.scores.std()) if batch.size > 1 else 0.0,
        "accuracy": float(batch.correct.float().mean()),
        "response_len/mean": float(mask.sum(1).mean()),
        "response_len/clipped_frac": float((mask[:, -1] > 0).float().mean()),
        "advantages/mean": float(ops.masked_mean(batch.advantages, adv_mask)),
        "advantages/std": float(ops.masked_var(batch.advantages, adv_mask).sqrt()),
    }
    if batch.env_stats is not None:  # per trajectory, averaged: turns, tool calls and errors, truncation, drift
        metrics.update({f"env/{name}": float(values.float().mean()) for name, values in batch.env_stats.items()})
    if batch.values is not None:
        residual_var = ops.masked_var(batch.returns - batch.values, mask)
        metrics["value/mean"] = float(ops.masked_mean(batch.values, mask))
        metrics["returns/mean"] = float(ops.masked_mean(batch.returns, mask))
        # 1 − Var(R − V) / Var(R): 1 is a perfect critic, ≤ 0 no better than predicting the mean.
        metrics["value/explained_variance"] = float(
            1 - residual_var / ops.masked_var(batch.returns, mask).clamp(min=1e-8)
        )
    return metrics


def sample_rows(batch: Batch, count: int) -> list[dict]:
    """``count`` rows spread over the batch, for sample tables (a multi-turn row shows its whole
    conversation after the prompt: replies, tool calls and results)."""
    stride = max(1, batch.size // max(1, count))
    return [
        {"prompt": batch.prompts[i], "completion": _shown_completion(batch, i), "answer": batch.answers[i],
         "reward": float(batch.scores[i]), "correct": bool(batch.correct[i]) if batch.correct is not None else None}
        for i in range(0, batch.size, stride)[:count]
    ]  # fmt: skip


def episode_text(messages: list[dict]) -> str:
    """A multi-turn episode after its first user message, one "[role] content" line per message."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), -1)
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages[first_user + 1 :])


def _shown_completion(batch: Batch, row: int) -> str:
    return batch.completions[row] if batch.conversations is None else episode_text(batch.conversations[row])


def reward_chats(batch: Batch, conversations: list[list[dict]], group_size: int) -> list[list[dict]]:
    """What the reward terms see before the reply they score: the prompt's chat, or in a multi-turn
    episode every message before the final reply (tool calls and results included)."""
    if batch.conversations is not None:
        return [messages[:-1] for messages in batch.conversations]
    return [chat for chat in conversations for _ in range(group_size)]
