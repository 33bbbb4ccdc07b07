"""The algorithm core: pure torch functions, picked by name from ``conf/algo/*.yaml``.

The trainer sees one object, :class:`Algorithm`, with two methods: ``advantages`` and ``loss``.
Which estimator, loss, aggregation and KL it uses is data, never a branch on an algorithm's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlctl.algos import advantages as adv
from rlctl.algos import kl, losses, ops
from rlctl.algos.registry import Registry


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. scores [B]; mask [B, T]; values [B, T] only for critic-based ones."""

    scores: torch.Tensor
    mask: torch.Tensor
    group_size: int
    values: torch.Tensor | None = None


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[AdvantageInputs, "Algorithm"], torch.Tensor]  # -> advantages [B] or [B, T]
    needs_values: bool  # a critic exists iff this is true
    min_group_size: int  # 2 for estimators with a group baseline


ADVANTAGE_ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable] = Registry("policy loss")

ADVANTAGE_ESTIMATORS.register("reinforce")(Estimator(lambda x, a: adv.reinforce(x.scores), False, 1))
ADVANTAGE_ESTIMATORS.register("grpo")(
    Estimator(lambda x, a: adv.grpo(x.scores, x.group_size, a.scale_by_std, a.std_eps), False, 2)
)
ADVANTAGE_ESTIMATORS.register("rloo")(Estimator(lambda x, a: adv.rloo(x.scores, x.group_size), False, 2))
ADVANTAGE_ESTIMATORS.register("reinforce_pp")(Estimator(lambda x, a: adv.reinforce_pp(x.scores, x.mask), False, 1))
POLICY_LOSSES.register("ppo_clip")(losses.ppo_clip)
POLICY_LOSSES.register("pg")(losses.pg)


@dataclass(frozen=True)
class Algorithm:
    """Everything that distinguishes REINFORCE, GRPO, RLOO, Dr.GRPO …, as plain values."""

    advantage: str = "grpo"
    policy_loss: str = "ppo_clip"
    group_size: int = 8
    scale_by_std: bool = True
    std_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: str = "token-mean"
    norm_length: int | None = None  # the constant L of seq-mean-token-sum-norm (None: padded length)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        estimator = ADVANTAGE_ESTIMATORS.get(self.advantage)  # fails with the known names
        POLICY_LOSSES.get(self.policy_loss)
        if self.loss_agg not in ops.AGGREGATIONS:
            raise KeyError(f"unknown loss aggregation {self.loss_agg!r}; known: {list(ops.AGGREGATIONS)}")
        if self.kl_estimator not in kl.KINDS:
            raise KeyError(f"unknown KL estimator {self.kl_estimator!r}; known: {list(kl.KINDS)}")
        if self.group_size < estimator.min_group_size:
            raise ValueError(
                f"advantage estimator {self.advantage!r} compares each completion with the other completions "
                f"of its prompt, so it needs group_size ≥ {estimator.min_group_size} (got {self.group_size}): "
                "with one completion per prompt the baseline equals the reward and every advantage is 0"
            )

    @property
    def needs_values(self) -> bool:
        return ADVANTAGE_ESTIMATORS.get(self.advantage).needs_values

    @property
    def needs_reference(self) -> bool:
        """A reference model is loaded only when the KL term can matter."""
        return self.kl_coef != 0.0

    def advantages(self, inputs: AdvantageInputs) -> torch.Tensor:
        """Advantages [B] (sequence-level) or [B, T] (token-level) for a scored batch."""
        return ADVANTAGE_ESTIMATORS.get(self.advantage).fn(inputs, self)

    def loss(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_logp: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """loss = policy_loss + β·agg(KL(π‖π_ref)) − c_ent·agg(entropy); all terms share one aggregation.

        logp, old_logp, mask, ref_logp, entropy: [B, T]; advantages [B] or [B, T]. Returns the scalar
        loss and detached stats (``loss/policy``, ``clip_frac``, ``approx_kl``, ``kl``, ``entropy``).
        """
        policy_loss, stats = POLICY_LOSSES.get(self.policy_loss)(
            logp, old_logp, advantages, mask, self.clip_low, self.clip_high, self.loss_agg, self.norm_length
        )
        stats = {"loss/policy": policy_loss.detach(), **stats}
        total = policy_loss
        if ref_logp is not None:
            kl_per_token = kl.estimate(logp, ref_logp, self.kl_estimator)
            total = total + self.kl_coef * ops.aggregate(kl_per_token, mask, self.loss_agg, self.norm_length)
            stats["kl"] = ops.masked_mean(kl_per_token.detach(), mask)
        if entropy is not None:
            if self.entropy_coef:
                total = total - self.entropy_coef * ops.aggregate(entropy, mask, self.loss_agg, self.norm_length)
            stats["entropy"] = ops.masked_mean(entropy.detach(), mask)
        return total, stats


__all__ = ["ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "AdvantageInputs", "Algorithm", "Estimator", "adv", "kl", "losses", "ops"]
