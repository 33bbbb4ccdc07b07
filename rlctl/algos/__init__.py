"""The algorithm core: pure torch functions, picked by name from ``conf/algo/*.yaml``.

The trainer sees one object, :class:`Algorithm`. Which estimator, losses, aggregation and KL
placement it uses is data, never a branch on an algorithm's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlctl.algos import advantages as adv
from rlctl.algos import kl, losses, ops, shaping
from rlctl.algos.registry import Registry


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. B sequences, T response tokens."""

    scores: torch.Tensor  # [B] sequence scores
    mask: torch.Tensor  # [B, T]
    group_size: int
    token_rewards: torch.Tensor | None = (
        None  # [B, T] score on the last token (or step rewards) − β·KL if in the reward
    )
    values: torch.Tensor | None = None  # [B, T] critic values, for estimators that need them


Advantages = tuple[torch.Tensor, torch.Tensor | None]  # (advantages [B] or [B, T], returns [B, T] or None)


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[AdvantageInputs, Algorithm], Advantages]
    needs_values: bool  # a critic exists iff this is true
    min_group_size: int  # 2 for estimators with a group baseline


ADVANTAGE_ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable] = Registry("policy loss")
VALUE_LOSSES: Registry[Callable] = Registry("value loss")


def _gae(x: AdvantageInputs, a: Algorithm) -> Advantages:
    advantages, returns = adv.gae(x.token_rewards, x.values, x.mask, a.gamma, a.lam)
    return ops.masked_whiten(advantages, x.mask), returns


ADVANTAGE_ESTIMATORS.register("reinforce")(Estimator(lambda x, a: (adv.reinforce(x.scores), None), False, 1))
ADVANTAGE_ESTIMATORS.register("grpo")(
    Estimator(lambda x, a: (adv.grpo(x.scores, x.group_size, a.scale_by_std, a.std_eps), None), False, 2)
)
ADVANTAGE_ESTIMATORS.register("rloo")(Estimator(lambda x, a: (adv.rloo(x.scores, x.group_size), None), False, 2))
ADVANTAGE_ESTIMATORS.register("reinforce_pp")(
    Estimator(lambda x, a: (adv.reinforce_pp(x.token_rewards, x.mask, a.gamma), None), False, 1)
)
ADVANTAGE_ESTIMATORS.register("gae")(Estimator(_gae, True, 1))
POLICY_LOSSES.register("ppo_clip")(losses.ppo_clip)
POLICY_LOSSES.register("pg")(losses.pg)
POLICY_LOSSES.register("gspo")(losses.gspo)
VALUE_LOSSES.register("clipped_mse")(losses.clipped_value_loss)
KL_PLACEMENTS = ("in_loss", "in_reward")


@dataclass(frozen=True)
class Algorithm:
    """Everything that distinguishes PPO, GRPO, RLOO, Dr.GRPO, DAPO, GSPO …, as plain values."""

    advantage: str = "grpo"
    policy_loss: str = "ppo_clip"
    group_size: int = 8
    scale_by_std: bool = True
    std_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    loss_agg: str = "token-mean"
    norm_length: int | None = None  # the constant L of seq-mean-token-sum-norm (None: padded length)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "in_loss"
    kl_target: float | None = None  # adaptive β when set
    kl_horizon: int = 10_000
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    value_loss: str = "clipped_mse"
    value_clip: float = 0.2
    vf_coef: float = 1.0
    overlong_buffer: int = 0  # DAPO soft overlong punishment zone, in tokens (0 = off)
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = False  # DAPO: keep only groups whose rewards differ

    def __post_init__(self) -> None:
        estimator = ADVANTAGE_ESTIMATORS.get(self.advantage)  # fails with the known names
        POLICY_LOSSES.get(self.policy_loss)
        VALUE_LOSSES.get(self.value_loss)
        if self.loss_agg not in ops.AGGREGATIONS:
            raise KeyError(f"unknown loss aggregation {self.loss_agg!r}; known: {list(ops.AGGREGATIONS)}")
        if self.kl_estimator not in kl.KINDS:
            raise KeyError(f"unknown KL estimator {self.kl_estimator!r}; known: {list(kl.KINDS)}")
        if self.kl_placement not in KL_PLACEMENTS:
            raise KeyError(f"unknown KL placement {self.kl_placement!r}; known: {list(KL_PLACEMENTS)}")
        if self.group_size < estimator.min_group_size:
            raise ValueError(
                f"advantage estimator {self.advantage!r} compares each completion with the other completions "
                f"of its prompt, so it needs group_size ≥ {estimator.min_group_size} (got {self.group_size}): "
                "with one completion per prompt the baseline equals the reward and every advantage is 0"
            )
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("dynamic sampling keeps groups whose rewards differ, so it needs group_size ≥ 2")

    @property
    def needs_values(self) -> bool:
        """A critic is built iff the advantage estimator reads values."""
        return ADVANTAGE_ESTIMATORS.get(self.advantage).needs_values

    @property
    def needs_reference(self) -> bool:
        """A reference model is loaded only when the KL term can matter."""
        return self.kl_coef != 0.0 or self.kl_target is not None

    @property
    def kl_in_reward(self) -> bool:
        return self.needs_reference and self.kl_placement == "in_reward"

    def shape_scores(self, scores: torch.Tensor, response_lengths: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Scores after the overlong penalty (a no-op unless overlong_buffer > 0). [B] -> [B]."""
        return scores + shaping.overlong_penalty(
            response_lengths, max_new_tokens, self.overlong_buffer, self.overlong_penalty
        )

    def token_rewards(
        self,
        scores: torch.Tensor,
        mask: torch.Tensor,
        step_rewards: torch.Tensor | None,
        logp: torch.Tensor | None,
        ref_logp: torch.Tensor | None,
        kl_coef: float,
    ) -> torch.Tensor:
        """Per-token rewards [B, T]: the score on the last token (or the step rewards), minus
        β·KL_t when the KL is placed in the reward."""
        penalty = kl.estimate(logp, ref_logp, self.kl_estimator) if self.kl_in_reward and ref_logp is not None else None
        return shaping.token_level_rewards(scores, mask, step_rewards, penalty, kl_coef)

    def advantages(self, inputs: AdvantageInputs) -> Advantages:
        """(advantages [B] or [B, T], returns [B, T] or None) for a scored batch."""
        return ADVANTAGE_ESTIMATORS.get(self.advantage).fn(inputs, self)

    def next_kl_coef(self, kl_coef: float, measured_kl: float, n_samples: int) -> float:
        """β for the next step: fixed, or moved towards ``kl_target`` by the adaptive controller."""
        if self.kl_target is None:
            return kl_coef
        return kl.adaptive_kl_coef(kl_coef, measured_kl, self.kl_target, self.kl_horizon, n_samples)

    def loss(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_logp: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        kl_coef: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """loss = policy_loss + β·agg(KL(π‖π_ref)) [if in the loss] − c_ent·agg(entropy); one aggregation for all.

        logp, old_logp, mask, ref_logp, entropy: [B, T]; advantages [B] or [B, T]. Returns the scalar
        loss and detached stats (``loss/policy``, ``clip_frac``, ``approx_kl``, ``kl``, ``entropy``).
        """
        beta = self.kl_coef if kl_coef is None else kl_coef
        policy_loss, stats = POLICY_LOSSES.get(self.policy_loss)(
            logp, old_logp, advantages, mask, clip_low=self.clip_low, clip_high=self.clip_high, agg=self.loss_agg,
            norm_length=self.norm_length, dual_clip=self.dual_clip,
        )  # fmt: skip
        stats = {"loss/policy": policy_loss.detach(), **stats}
        total = policy_loss
        if ref_logp is not None:
            kl_per_token = kl.estimate(logp, ref_logp, self.kl_estimator)
            if not self.kl_in_reward:
                total = total + beta * ops.aggregate(kl_per_token, mask, self.loss_agg, self.norm_length)
            stats["kl"] = ops.masked_mean(kl_per_token.detach(), mask)
        if entropy is not None:
            if self.entropy_coef:
                total = total - self.entropy_coef * ops.aggregate(entropy, mask, self.loss_agg, self.norm_length)
            stats["entropy"] = ops.masked_mean(entropy.detach(), mask)
        return total, stats

    def critic_loss(
        self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """vf_coef · value_loss(V, V_old, R); values, old_values, returns, mask [B, T]."""
        loss, stats = VALUE_LOSSES.get(self.value_loss)(
            values, old_values, returns, mask, self.value_clip, "token-mean"
        )
        return self.vf_coef * loss, {"loss/value": loss.detach(), **stats}


__all__ = [
    "ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "VALUE_LOSSES", "AdvantageInputs", "Algorithm", "Estimator",
    "adv", "kl", "losses", "ops", "shaping",
]  # fmt: skip
