"""Policy and value losses. logp, old_logp, mask: [B, T]; advantages [B] (one per sequence) or [B, T].

``token_weights`` [B, T] (no gradient) multiply each token's loss before aggregation: the
truncated importance weights of the rollout mismatch correction (``algos.correction``).

Every policy loss takes the same keyword arguments so the algorithm config can pick any of them by
name; a loss ignores the ones it has no use for. ``totals`` are the aggregation's denominators over
the whole minibatch (see ``ops.aggregate``); without them the rows given are the whole minibatch.
"""

from __future__ import annotations

import torch

from rlctl.algos.ops import AggregationTotals, aggregate, masked_mean


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages[:, None].expand_as(like) if advantages.ndim == 1 else advantages


def _weighted(per_token: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """Each token's loss times its importance weight (the rollout mismatch correction), if any."""
    return per_token if token_weights is None else per_token * token_weights.to(per_token.dtype)


def _stats(logp, old_logp, mask, clipped_mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        log_ratio = logp - old_logp
        return {
            "clip_frac": masked_mean(clipped_mask.to(logp.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(torch.exp(log_ratio), mask),
        }


def surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    totals: AggregationTotals | None = None,
    token_weights: torch.Tensor | None = None,
    **_unused,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRPO's importance-weighted surrogate, unclipped (Schulman et al. 2015):

    ρ_t = exp(logp_t − old_logp_t),   l_t = −ρ_t·A_t,   loss = aggregate(l, mask, agg)

    At θ = θold (ρ = 1) its gradient is the policy gradient −A·∇log π; away from it, the loss value
    is what the trust-region line search compares. The step size is bounded by the KL constraint,
    not by clipping, so ``clip_frac`` is 0. ``sampled_kl`` is the mean over tokens of
    (ρ − 1) − log ρ, Schulman's k3 estimate of KL(π_old ‖ π), which the line search checks on every token.
    """
    ratio = torch.exp(logp - old_logp)
    per_token = _weighted(-ratio * _per_token(advantages, logp), token_weights)
    loss = aggregate(per_token, mask, agg, totals=totals)
    stats = _stats(logp, old_logp, mask, torch.zeros_like(mask, dtype=torch.bool))
    with torch.no_grad():  # k3 on tokens sampled from π_old: an unbiased estimate of KL(π_old ‖ π) ≥ 0 per token
        stats["sampled_kl"] = masked_mean(ratio - 1 - (logp - old_logp), mask)
    return loss, stats


def ppo_clip(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    totals: AggregationTotals | None = None,
    dual_clip: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), asymmetric bounds as in DAPO's clip-higher.

    ρ_t = exp(logp_t − old_logp_t)
    l_t = −min(ρ_t·A_t, clip(ρ_t, 1−ε_low, 1+ε_high)·A_t)
    dual clip (Ye et al. 2020), for A_t < 0 only: l_t = min(l_t, −c·A_t), c > 1, which bounds the
    loss when a very large ratio meets a negative advantage.
    loss = aggregate(l, mask, agg)
    The gradient is zero where the ratio has left the clip range on the side the advantage pushes
    (ρ > 1+ε_high with A > 0, ρ < 1−ε_low with A < 0), and with dual clip where ρ > c and A < 0.
    Returns (loss, stats): ``clip_frac`` (share of valid tokens where a clipped term was chosen),
    ``approx_kl`` (mean ½(logp − old_logp)², an estimate of KL(old ‖ new)), ``ratio_mean``.
    """
    adv = _per_token(advantages, logp).to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -dual_clip * adv
        dual = (adv < 0) & (per_token > bound)
        per_token = torch.where(dual, bound, per_token)
        was_clipped = was_clipped | dual
    per_token = _weighted(per_token, token_weights)
    return aggregate(per_token, mask, agg, totals=totals), _stats(logp, old_logp, mask, was_clipped)


def pg(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    totals: AggregationTotals | None = None,
    token_weights: torch.Tensor | None = None,
    **_unused,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Vanilla policy gradient, no ratio and no clipping: l_t = −A_t·logp_t, aggregated.

    Its gradient equals ppo_clip's on the first pass over fresh samples (ρ = 1).
    """
    adv = _per_token(advantages, logp).to(logp.dtype)
    loss = aggregate(_weighted(-adv * logp, token_weights), mask, agg, totals=totals)
    return loss, _stats(logp, old_logp, mask, torch.zeros_like(mask, dtype=torch.bool))


def gspo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    agg: str = "seq-mean-token-mean",
    totals: AggregationTotals | None = None,
    token_weights: torch.Tensor | None = None,
    **_unused,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of the token ratios.

    s_i = exp( (1/|y_i|) Σ_t (logp_t − old_logp_t) )
    token form: s_{i,t} = sg[s_i] · π(y_t) / sg[π(y_t)]  (same value as s_i; gradient spread over tokens)
    l_{i,t} = −min(s_{i,t}·A_i, clip(s_{i,t}, 1−ε_low, 1+ε_high)·A_i), aggregated (the paper: seq-mean-token-mean).
    Advantages must be per sequence ([B], or [B, T] constant along T).
    """
    adv = _per_token(advantages, logp).to(logp.dtype)
    seq_log_ratio = masked_mean(logp - old_logp, mask, dim=-1)  # [B]
    token_log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()
    ratio = torch.exp(token_log_ratio)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = torch.maximum(unclipped, clipped)
    stats = _stats(logp, old_logp, mask, clipped > unclipped)
    stats["seq_ratio_mean"] = torch.exp(seq_log_ratio.detach()).mean()
    return aggregate(_weighted(per_token, token_weights), mask, agg, totals=totals), stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float = 0.2,
    agg: str = "token-mean",
    totals: AggregationTotals | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss: l_t = ½·max((V_t − R_t)², (V_clip,t − R_t)²),
    V_clip = old_V + clip(V − old_V, −c, c). values, old_values, returns, mask [B, T].

    Returns (loss, stats) with ``value_clip_frac`` (share of tokens where the clipped term was larger).
    """
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = aggregate(0.5 * torch.maximum(unclipped_error, clipped_error), mask, agg, totals=totals)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)}
    return loss, stats
