"""The sampling mismatch between the rollout engine and the trainer.

An inference engine (vLLM) and the training forward pass compute different probabilities for the
same weights and tokens: other kernels, other precision, a KV cache. The samples then come from
π_rollout, not from the π_train the loss assumes, and the update is off-policy even on its first
pass. Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training") reweights each token's policy-gradient term by
    w_t = min( π_train(y_t) / π_rollout(y_t), C )
where π_train is the trainer's probability under the weights that sampled (the old log-probs) and
C caps the variance the weights can add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlctl.algos.ops import masked_mean
from rlctl.errors import check_fields

CORRECTIONS = ("none", "tis")


def truncated_is_weights(
    train_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """w = min(exp(train_logp − rollout_logp), cap), with no gradient; and where the cap bit.

    train_logp, rollout_logp [B, T] -> weights [B, T], clipped [B, T] bool.
    """
    with torch.no_grad():
        ratio = torch.exp(train_logp.float() - rollout_logp.float())
        return ratio.clamp(max=cap), ratio > cap


@dataclass(frozen=True)
class MismatchCorrection:
    """``rollout.is_correction`` and ``rollout.is_cap``, filled by field name."""

    is_correction: str = "none"  # none | tis
    is_cap: float = 2.0  # C

    def __post_init__(self) -> None:
        checks = (
            ("is_correction", self.is_correction in CORRECTIONS, f"must be one of {list(CORRECTIONS)}"),
            ("is_cap", self.is_cap >= 1.0, "must be ≥ 1 (a cap below 1 shrinks every on-policy token)"),
        )
        check_fields(self, checks)

    def weights(
        self, train_logp: torch.Tensor, rollout_logp: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Per-token loss weights (None: no correction) and what the mismatch looks like.

        train_logp, rollout_logp, mask [B, T]. Stats (means over valid tokens): ``rollout/logprob_abs_diff``
        = mean |train_logp − rollout_logp|; with tis ``rollout/is_clipped_frac`` and ``rollout/is_weight_mean``.
        No rollout log-probs (the hf backend samples with the training weights themselves): nothing.
        """
        if rollout_logp is None:
            return None, {}
        stats = {"rollout/logprob_abs_diff": masked_mean((train_logp.detach() - rollout_logp).abs(), mask)}
        if self.is_correction == "none":
            return None, stats
        weights, clipped = truncated_is_weights(train_logp, rollout_logp, self.is_cap)
        stats["rollout/is_clipped_frac"] = masked_mean(clipped.float(), mask)
        stats["rollout/is_weight_mean"] = masked_mean(weights, mask)
        return weights, stats
