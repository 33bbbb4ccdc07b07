"""Rollout with transformers ``generate``: prompts are left-padded to a common length so the
responses of every chunk line up in one [B, L] tensor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rlctl.batch import Batch
from rlctl.distributed import max_over_ranks
from rlctl.errors import check_fields


@dataclass(frozen=True)
class SamplingParams:
    """The ``rollout`` config group, filled by field name."""

    backend: str = "hf"  # hf | vllm
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64  # sequences per generate call

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, "must be ≥ 1"),
            ("temperature", self.temperature >= 0, "must be ≥ 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be ≥ 0 (0 = off)"),
            ("batch_size", self.batch_size >= 1, "must be ≥ 1"),
        )
        check_fields(self, checks)


class Sampled(NamedTuple):
    """One sampled continuation: its token ids (EOS included when it ended), the rollout engine's
    log-prob of each (None when the backend gives none), and whether it ended with EOS."""

    token_ids: list[int]
    logprobs: list[float] | None
    ended: bool


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[[1, 2], [3]] -> ids [[1, 2], [pad, 3]], mask [[1, 1], [0, 1]]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def response_mask_until_eos(responses: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on every token up to and including the first EOS, 0 after it. responses [B, T] -> [B, T]."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids))
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~eos_seen_before).float()


def eos_token_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def assemble(
    tokenizer,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    answers: list[str],
    group_size: int,
    prompt_texts: list[str] | None,
    rollout_logprobs: torch.Tensor | None = None,
) -> Batch:
    """The rollout's Batch from left-padded prompts [B, Lp] and right-padded responses [B, T] whose
    mask is 1 up to and including EOS; rows p·G … p·G+G−1 belong to prompt p."""
    responses = torch.where(response_mask.bool(), responses, tokenizer.pad_token_id)
    n_prompts = prompt.shape[0] // group_size
    return Batch(
        input_ids=torch.cat([prompt, responses], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        group_ids=torch.arange(n_prompts).repeat_interleave(group_size),
        prompts=[t for t in prompt_texts for _ in range(group_size)]
        if prompt_texts is not None
        else tokenizer.batch_decode(prompt, skip_special_tokens=True),
        completions=tokenizer.batch_decode(responses, skip_special_tokens=True),
        answers=[a for a in answers for _ in range(group_size)],
        rollout_logprobs=rollout_logprobs,
    )


class HFRollout:
    """Samples with the training model itself (transformers ``generate``), so the sampling policy
    is the trained one by construction: no weights to copy and no log-prob mismatch to correct
    beyond the KV cache's rounding."""

    gives_logprobs = False  # the sampling model is the trained one: its log-probs are scored, not kept

    def __init__(
        self, tokenizer, params: SamplingParams, autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext
    ):
        self.tokenizer, self.params, self.autocast = tokenizer, params, autocast
        self.eos_ids = eos_token_ids(tokenizer)

    def with_params(self, params: SamplingParams) -> HFRollout:
        return HFRollout(self.tokenizer, params, self.autocast)

    def load_weights_of(self, policy) -> None:
        """Nothing to copy: generate runs the policy's own model."""

    @torch.no_grad()
    def generate(
        self,
        policy,
        prompt_ids: list[list[int]],
        answers: list[str],
        group_size: int,
        prompt_texts: list[str] | None = None,
        conversations: list[list[dict]] | None = None,
    ) -> Batch:
        """Sample ``group_size`` completions for each prompt; rows p·G … p·G+G−1 belong to prompt p.

        ``policy``: an engine (or ``FrozenPolicy``); under ZeRO-3 its weights are gathered once for
        the whole rollout. ``prompt_texts`` are what sample tables show (default: the decoded
        prompt, template included). ``conversations`` (the chats the prompts stand for) start the
        environments of a multi-turn rollout; one turn has no use for them.
        """
        repeated = [ids for ids in prompt_ids for _ in range(group_size)]
        prompt, prompt_mask = left_pad(repeated, self.tokenizer.pad_token_id)
        responses = self._sample(policy, prompt, prompt_mask, self.params.max_new_tokens)
        response_mask = response_mask_until_eos(responses, self.eos_ids)
        return assemble(
            self.tokenizer, prompt, prompt_mask, responses, response_mask, answers, group_size, prompt_texts
        )

    @torch.no_grad()
    def complete(self, policy, sequences: list[list[int]], max_new_tokens: int) -> list[Sampled]:
        """One continuation of each token sequence (a turn of a conversation), up to and including
        EOS or ``max_new_tokens`` tokens. No log-probs: the sampling model is the trained one.
        A rank with no sequences (its episodes have ended) samples nothing but keeps step with the
        ranks that do (see ``_sample``)."""
        if not sequences:
            if policy.synced_generation:
                empty = torch.zeros((0, 1), dtype=torch.long)
                self._sample(policy, empty, empty, max_new_tokens)
            return []
        prompt, prompt_mask = left_pad(sequences, self.tokenizer.pad_token_id)
        responses = self._sample(policy, prompt, prompt_mask, max_new_tokens)
        lengths = response_mask_until_eos(responses, self.eos_ids).sum(dim=1).int().tolist()
        return [
            Sampled(row[:n], None, n > 0 and row[n - 1] in self.eos_ids) for row, n in zip(responses.tolist(), lengths)
        ]

    def _sample(self, policy, prompt: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """[B, Lp] left-padded prompts -> [B, T] sampled tokens (pad after EOS), in chunks of
        ``batch_size`` rows. When generating is collective (``policy.synced_generation``: ZeRO-3 on
        several ranks) every generate call runs in step over the ranks (transformers' ``synced_gpus``)
        and every rank makes as many calls as the rank with the most chunks: one with fewer rows (a
        multi-turn rollout whose episodes ended) generates from a one-token stand-in and discards it."""
        p = self.params
        synced = policy.synced_generation
        chunks = -(-prompt.shape[0] // p.batch_size)
        if synced:
            chunks = int(max_over_ranks(float(chunks)))
        stand_in, stand_in_mask = (
            torch.full((1, 1), self.eos_ids[0], dtype=torch.long),
            torch.ones((1, 1), dtype=torch.long),
        )
        sampling = (
            {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k}
            if p.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        sampled = []
        with policy.generation_context():
            model = policy.unwrapped()
            was_training = model.training
            model.eval()
            for start in range(0, chunks * p.batch_size, p.batch_size):
                rows = slice(start, start + p.batch_size)
                ids, mask = (prompt[rows], prompt_mask[rows]) if start < prompt.shape[0] else (stand_in, stand_in_mask)
                with self.autocast():
                    out = model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                        eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id, synced_gpus=synced,
                        **sampling,
                    )  # fmt: skip
                if start < prompt.shape[0]:
                    sampled.append(out[:, prompt.shape[1] :])
            model.train(was_training)
        if not sampled:
            return torch.zeros((0, 1), dtype=torch.long)
        width = max(c.shape[1] for c in sampled)
        return torch.cat(
            [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=self.tokenizer.pad_token_id) for c in sampled]
        )


def step_rewards_to_tokens(
    tokenizer, responses: torch.Tensor, response_mask: torch.Tensor, steps: list[list[tuple[int, float]]]
) -> torch.Tensor:
    """Place step rewards given at character offsets of the decoded completion onto response tokens.

    A reward at offset c goes to the first token whose decoded text reaches character c (the token
    that completes the step); one at or past the end of the text goes to the last valid token, where
    a whole-sequence score sits.
    responses, response_mask [B, T]; steps: per row [(offset, reward)] -> [B, T].
    """
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    for row, row_steps in enumerate(steps):
        n_valid = int(response_mask[row].sum())
        if n_valid == 0 or not row_steps:
            continue
        ends, length = [], 0
        for token in responses[row, :n_valid].tolist():
            length += len(tokenizer.decode([token], skip_special_tokens=True))
            ends.append(length)
        for offset, reward in row_steps:
            if offset >= ends[-1]:
                index = n_valid - 1
            else:
                index = next(i for i, end in enumerate(ends) if end >= offset and end > 0)
            out[row, index] += reward
    return out
