"""Policy losses. logp, old_logp, mask: [B, T]; advantages [B] (one per sequence) or [B, T]."""

from __future__ import annotations

import torch

from rlctl.algos.ops import aggregate, masked_mean


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages[:, None].expand_as(like) if advantages.ndim == 1 else advantages


def ppo_clip(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), asymmetric bounds as in DAPO's clip-higher.

    ρ_t = exp(logp_t − old_logp_t)
    l_t = −min(ρ_t·A_t, clip(ρ_t, 1−ε_low, 1+ε_high)·A_t)
    loss = aggregate(l, mask, agg)
    The gradient is zero where the ratio has left the clip range on the side the advantage pushes
    (ρ > 1+ε_high with A > 0, ρ < 1−ε_low with A < 0).
    Returns (loss, stats) with stats ``clip_frac`` (share of valid tokens where the clipped term
    was chosen) and ``approx_kl`` (mean of ½(logp − old_logp)², an estimate of KL(old ‖ new)).
    """
    adv = _per_token(advantages, logp).to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = aggregate(per_token, mask, agg, norm_length)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def pg(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Vanilla policy gradient, no ratio and no clipping: l_t = −A_t·logp_t, aggregated.

    Same signature as ``ppo_clip`` (the clip bounds and old_logp are unused) so either can be
    picked by name; its gradient equals ppo_clip's on the first pass over fresh samples.
    """
    adv = _per_token(advantages, logp).to(logp.dtype)
    loss = aggregate(-adv * logp, mask, agg, norm_length)
    with torch.no_grad():
        stats = {
            "clip_frac": torch.zeros((), dtype=logp.dtype),
            "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask),
            "ratio_mean": masked_mean(torch.exp(logp - old_logp), mask),
        }
    return loss, stats
