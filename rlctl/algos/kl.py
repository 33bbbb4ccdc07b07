"""Per-token estimators of KL(π ‖ π_ref) from log-probabilities of sampled tokens (Schulman 2020).

With log-ratio x = log π(a) − log π_ref(a), a ~ π:
  k1 = x                       unbiased, can be negative
  k2 = x² / 2                  biased, low variance, ≥ 0
  k3 = (e^{−x} − 1) + x        unbiased, ≥ 0 (GRPO's choice)
Shapes: logp, ref_logp [B, T] -> [B, T].
"""

from __future__ import annotations

import torch

KINDS = ("k1", "k2", "k3")
_LOG_RATIO_CLAMP = 20.0  # e^{20} ≈ 5e8: keeps k3 finite when the policies disagree wildly


def estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate of the given ``kind`` (k1, k2 or k3); see the module docstring."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        x = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return torch.expm1(-x) + x
    raise KeyError(f"unknown KL estimator {kind!r}; known: {list(KINDS)}")


def adaptive_kl_coef(kl_coef: float, measured_kl: float, target: float, horizon: int, n_steps: int = 1) -> float:
    """The adaptive penalty of Ziegler et al. 2019 (PPO-penalty): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon).

    β rises when the measured KL is above the target and falls when below; ``n_steps`` samples
    were seen since the last update and ``horizon`` sets how fast β reacts.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
    error = min(max(measured_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
