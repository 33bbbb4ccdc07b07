"""The typed batch that flows through a step. Each stage returns a copy with more fields filled."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Batch:
    """B = P prompts × G completions, in group order; L = prompt + response length; T = response length.

    input_ids [B, L] holds the left-padded prompt then the right-padded response;
    response_mask [B, T] is 1 on generated tokens up to and including EOS.
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
    old_logprobs: torch.Tensor | None = None  # [B, T] from the policy that sampled (None: same as current)
    ref_logprobs: torch.Tensor | None = None  # [B, T] from the frozen reference
    advantages: torch.Tensor | None = None  # [B] or [B, T]

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    def with_(self, **fields) -> "Batch":
        return replace(self, **fields)

    def rows(self, index: torch.Tensor) -> "Batch":
        """A sub-batch of the given rows (tensors sliced, lists picked)."""
        picked = {}
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                picked[name] = value[index]
            elif isinstance(value, list):
                picked[name] = [value[i] for i in index.tolist()]
            else:
                picked[name] = value
        return Batch(**picked)
