"""Reward shaping: from sequence scores to per-token rewards, overlong penalties, group filtering.

B sequences, T response tokens; mask [B, T] is 1 on valid response tokens.
"""

from __future__ import annotations

import torch


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row (0 for an empty row). mask [B, T] -> [B] long."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def token_level_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    step_rewards: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    length_penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """r_t = score·[t = last valid token] − β·KL_t, zero on padding; with process rewards
    r_t = step_t + penalty·[t = last valid token] − β·KL_t.

    scores [B] (any length penalty already included); step_rewards [B, T] (process rewards placed on
    their tokens; when given they replace the last-token score, but not the length penalty, which
    still lands on the last valid token); kl [B, T] per-token KL estimate for the in-reward penalty;
    length_penalty [B] (e.g. DAPO's overlong punishment). -> [B, T].
    """
    mask = mask.to(torch.float32)
    last = last_token_index(mask)[:, None]
    if step_rewards is not None:
        rewards = step_rewards.to(torch.float32).clone()
        if length_penalty is not None:
            rewards.scatter_add_(1, last, length_penalty.to(torch.float32)[:, None])
    else:
        rewards = torch.zeros_like(mask)
        rewards.scatter_(1, last, scores.to(torch.float32)[:, None])
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl.to(torch.float32)
    return rewards * mask


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), added to the score.

    0 for L ≤ L_max − buffer; ((L_max − buffer) − L) / buffer · factor in the buffer zone, falling
    linearly to −factor at L = L_max (and below past it). lengths [B] -> [B].
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_length - buffer
    return ((start - lengths.to(torch.float32)).clamp(max=0.0) / buffer) * factor


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: True for groups whose rewards are not all equal (the others
    have zero group-relative advantage and teach nothing). scores [P·G] -> [P] bool."""
    grouped = scores.view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > 0
