"""Advantage estimators. N = number of sampled completions, laid out group by group
(the G completions of prompt p occupy rows p·G … p·G+G−1); B, T = sequences, response tokens."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlctl.algos.ops import masked_whiten


def reinforce(scores: torch.Tensor) -> torch.Tensor:
    """A_i = r_i: the raw reward, no baseline (the naive REINFORCE objective). scores [N] -> [N]."""
    return scores.clone()


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group size must be ≥ 2 for a group baseline, got {group_size}")
    if scores.ndim != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def grpo(
    scores: torch.Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    std_scope: str = "group",
    sum_over_ranks: Callable[[list[float]], list[float]] | None = None,
) -> torch.Tensor:
    """GRPO (DeepSeekMath 2024): A_i = (r_i − mean_g r) / (std r + eps). scores [N] -> [N].

    The mean is always the group's (the G completions of one prompt). The std that divides is
      std_scope="group": the group's own std_g r (DeepSeekMath; TRL's scale_rewards="group");
      std_scope="batch": one std over every score of the step on every process (TRL's
        scale_rewards="batch"): with n, S1 = Σ r, S2 = Σ r² summed over ranks by ``sum_over_ranks``,
        std = sqrt((S2 − S1²/n) / (n − 1)), so two processes divide by what one process would.
    Both are the unbiased (Bessel-corrected, divide by n−1) sample standard deviation, as
    ``torch.std`` computes it and as the reference implementations use.
    ``scale_by_std=False`` gives Dr.GRPO's A_i = r_i − mean_g r (no std, whatever the scope).
    A group whose rewards are all equal gets advantage 0 for every member.
    eps: TRL adds 1e-4, rlctl 1e-6 by default (algo.std_eps); on a group whose std is ~5e-4 that
    changes the advantages by ~20 %.
    """
    grouped = _groups(scores, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        if std_scope == "group":
            std = grouped.std(dim=1, keepdim=True)
        elif std_scope == "batch":
            std = torch.as_tensor(batch_std(scores, sum_over_ranks), dtype=scores.dtype)
        else:
            raise ValueError(f"unknown std scope {std_scope!r}; known: {list(STD_SCOPES)}")
        centred = centred / (std + eps)
    return centred.reshape(-1)


STD_SCOPES = ("group", "batch")


def batch_std(scores: torch.Tensor, sum_over_ranks: Callable[[list[float]], list[float]] | None = None) -> float:
    """The unbiased std of every score on every rank, from the sums n, Σ r, Σ r² (in float64).
    scores [N] -> a number; ``sum_over_ranks`` adds a list of numbers over ranks (None: one rank)."""
    values = scores.detach().double()
    sums = [float(values.numel()), float(values.sum()), float((values**2).sum())]
    n, s1, s2 = sum_over_ranks(sums) if sum_over_ranks is not None else sums
    if n < 2:
        return 0.0
    return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1))


def rloo(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i − (Σ_{j≠i} r_j) / (G − 1). scores [N] -> [N].

    Equal to G/(G−1) · (r_i − mean_g r).
    """
    grouped = _groups(scores, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{k ≥ t} γ^{k−t}·r_k over valid tokens. rewards, mask [B, T] -> [B, T] (0 where masked)."""
    mask = mask.to(rewards.dtype)
    running = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t].bool(), rewards[:, t] * mask[:, t] + gamma * running, running)
        out[:, t] = running * mask[:, t]
    return out


def reinforce_pp(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): A_t = whiten_batch(Σ_{k ≥ t} γ^{k−t}·r_k), a global baseline instead of a
    group one. token_rewards [B, T] (the score on the last token, minus β·KL_t when the KL is in the
    reward), mask [B, T] -> [B, T], whitened over every valid token of the batch."""
    return masked_whiten(returns_to_go(token_rewards, mask, gamma), mask)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t
    where t+1 means the next *valid* token and the value after the last valid token is 0 (the
    episode ends). rewards, values, mask: [B, T] -> (advantages [B, T], returns [B, T]), both 0 at
    masked positions. λ=0 gives the one-step TD error; λ=1 the discounted return minus V.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running_new = delta + gamma * lam * running
        # A padded position passes the running quantities through untouched, so padding in the
        # middle of a sequence (e.g. between process-reward steps) does not break the recursion.
        running = torch.where(valid.bool(), running_new, running)
        next_value = torch.where(valid.bool(), values[:, t], next_value)
        advantages[:, t] = running * valid
    returns = (advantages + values) * mask
    return advantages, returns
