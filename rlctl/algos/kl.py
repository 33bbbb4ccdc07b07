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
