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
from rlctl.algos.trust_region import TrustRegionSpec


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
    # adds a list of numbers over the processes of a launch, for statistics of the whole step (None: one process)
    sum_over_ranks: Callable[[list[float]], list[float]] | None = None


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
    Estimator(
        lambda x, a: (adv.grpo(x.scores, x.group_size, a.scale_by_std, a.std_eps, a.std_scope, x.sum_over_ranks), None),
        False,
        2,
    )
)
ADVANTAGE_ESTIMATORS.register("rloo")(Estimator(lambda x, a: (adv.rloo(x.scores, x.group_size), None), False, 2))
ADVANTAGE_ESTIMATORS.register("reinforce_pp")(
    Estimator(lambda x, a: (adv.reinforce_pp(x.token_rewards, x.mask, a.gamma), None), False, 1)
)
ADVANTAGE_ESTIMATORS.register("gae")(Estimator(_gae, True, 1))
POLICY_LOSSES.register("ppo_clip")(losses.ppo_clip)
POLICY_LOSSES.register("pg")(losses.pg)
POLICY_LOSSES.register("gspo")(losses.gspo)
POLICY_LOSSES.register("surrogate")(losses.surrogate)
VALUE_LOSSES.register("clipped_mse")(losses.clipped_value_loss)
KL_PLACEMENTS = ("in_loss", "in_reward")
UPDATES = ("optimizer", "trust_region")  # an AdamW step on the loss | TRPO's step (algos.trust_region)


@dataclass(frozen=True)
class Algorithm:
    """Everything that distinguishes PPO, GRPO, RLOO, Dr.GRPO, DAPO, GSPO …, as plain values.

    Its fields are the keys of the ``algo`` config group (``build`` fills them by name), plus
    ``max_new_tokens`` from the rollout. Every question about the algorithm (is there a critic, a
    reference, are old log-probs needed, does the entropy need a gradient) is answered here.
    Construction checks every value; an error message starts with the name of the field at fault.
    """

    name: str = "grpo"
    advantage: str = "grpo"
    policy_loss: str = "ppo_clip"
    group_size: int = 8
    scale_by_std: bool = True
    std_eps: float = 1e-6
    std_scope: str = "group"  # the std that divides: each group's, or the whole step's (TRL scale_rewards="batch")
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    loss_agg: str = "token-mean"
    norm_by_max_new_tokens: bool = False  # seq-mean-token-sum-norm: L = max_new_tokens (else the longest response)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "in_loss"
    kl_target: float | None = None  # adaptive β when set
    kl_horizon: int = 10_000
    entropy_coef: float = 0.0
    num_iterations: int = 1  # passes over each step's samples
    gamma: float = 1.0
    lam: float = 0.95
    value_loss: str = "clipped_mse"
    value_clip: float = 0.2
    vf_coef: float = 1.0
    overlong_buffer: int = 0  # DAPO soft overlong punishment zone, in tokens (0 = off)
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = False  # DAPO: keep only groups whose rewards differ
    sampling_retries: int = 3
    update: str = "optimizer"  # optimizer | trust_region (TRPO: conjugate gradient and a line search under max_kl)
    max_kl: float = 0.02  # trust_region: δ, the largest mean KL(π_old ‖ π_new) per trained token of a step
    cg_iters: int = 10  # trust_region: conjugate-gradient iterations
    cg_damping: float = 0.1  # trust_region: F + damping·I
    fisher_fraction: float = 1.0  # trust_region: share of the minibatch's samples the Fisher products use
    line_search_steps: int = 10  # trust_region: tries Δ, Δ/2, …
    max_new_tokens: int = 16  # the rollout's length limit (overlong punishment, Dr.GRPO's L)

    def __post_init__(self) -> None:
        for key, registry in (("advantage", ADVANTAGE_ESTIMATORS), ("policy_loss", POLICY_LOSSES),
                              ("value_loss", VALUE_LOSSES)):  # fmt: skip
            if getattr(self, key) not in registry:
                raise ValueError(f"{key}: unknown {registry.kind} {getattr(self, key)!r}; known: {registry.names()}")
        for key, known in (
            ("loss_agg", ops.AGGREGATIONS),
            ("kl_estimator", kl.KINDS),
            ("kl_placement", KL_PLACEMENTS),
            ("std_scope", adv.STD_SCOPES),
        ):
            if getattr(self, key) not in known:
                raise ValueError(f"{key}: unknown value {getattr(self, key)!r}; known: {list(known)}")
        estimator = ADVANTAGE_ESTIMATORS.get(self.advantage)
        if self.group_size < estimator.min_group_size:
            raise ValueError(
                f"group_size: advantage estimator {self.advantage!r} compares each completion with the other "
                f"completions of its prompt, so it needs group_size ≥ {estimator.min_group_size} (got "
                f"{self.group_size}): with one completion per prompt the baseline equals the reward and every advantage is 0"
            )
        if self.update == "trust_region" and self.policy_loss != "surrogate":
            raise ValueError(
                f"policy_loss: the trust-region step (update=trust_region, algo=trpo) maximises the unclipped "
                f"importance-weighted surrogate; use policy_loss=surrogate, got {self.policy_loss!r}"
            )
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("dynamic_sampling: keeps groups whose rewards differ, so it needs group_size ≥ 2")
        checks = (
            ("group_size", self.group_size >= 1, "must be ≥ 1"),
            ("num_iterations", self.num_iterations >= 1, "must be ≥ 1"),
            ("sampling_retries", self.sampling_retries >= 0, "must be ≥ 0"),
            ("clip_low", 0.0 <= self.clip_low < 1.0, "must be in [0, 1): the ratio's lower bound is 1 − clip_low"),
            ("clip_high", self.clip_high >= 0.0, "must be ≥ 0: the ratio's upper bound is 1 + clip_high"),
            ("dual_clip", self.dual_clip is None or self.dual_clip > 1.0,
             "must be > 1 (e.g. 3: the loss of a negative advantage is bounded at −c·A), or null to turn it off"),
            ("kl_coef", self.kl_coef >= 0.0, "must be ≥ 0"),
            ("kl_target", self.kl_target is None or self.kl_target > 0.0,
             "must be > 0 (the per-token KL the adaptive β aims for), or null for a fixed β"),
            ("kl_horizon", self.kl_horizon > 0, "must be > 0"),
            ("std_eps", self.std_eps >= 0.0, "must be ≥ 0"),
            ("gamma", 0.0 <= self.gamma <= 1.0, "must be in [0, 1]"),
            ("lam", 0.0 <= self.lam <= 1.0, "must be in [0, 1]"),
            ("value_clip", self.value_clip > 0.0, "must be > 0"),
            ("vf_coef", self.vf_coef >= 0.0, "must be ≥ 0"),
            ("overlong_buffer", 0 <= self.overlong_buffer <= self.max_new_tokens,
             f"must be between 0 and rollout.max_new_tokens={self.max_new_tokens}"),
            ("max_new_tokens", self.max_new_tokens >= 1, "(rollout.max_new_tokens) must be ≥ 1"),
            ("max_kl", self.max_kl > 0, "must be > 0 (the mean KL per token a trust-region step may reach)"),
            ("cg_iters", self.cg_iters >= 1, "must be ≥ 1"),
            ("cg_damping", self.cg_damping >= 0, "must be ≥ 0"),
            ("fisher_fraction", 0 < self.fisher_fraction <= 1, "must be in (0, 1]: the share of samples for F·v"),
            ("line_search_steps", self.line_search_steps >= 1, "must be ≥ 1"),
        )  # fmt: skip
        for key, ok, requirement in checks:
            if not ok:
                raise ValueError(f"{key}: {requirement}, got {getattr(self, key)}")

    @property
    def needs_values(self) -> bool:
        """A critic is built iff the advantage estimator reads values."""
        return ADVANTAGE_ESTIMATORS.get(self.advantage).needs_values

    @property
    def trust_region(self) -> bool:
        """The policy takes TRPO's step (no optimiser, no clipping); a critic still uses its optimiser."""
        return self.update == "trust_region"

    @property
    def update_name(self) -> str:
        """What one minibatch makes of the policy, as the batch layout says it."""
        return "trust-region steps" if self.trust_region else "optimiser updates"

    def trust_region_spec(self) -> TrustRegionSpec:
        return TrustRegionSpec(self.max_kl, self.cg_iters, self.cg_damping, self.line_search_steps)

    @property
    def needs_reference(self) -> bool:
        """A reference model is loaded only when the KL term can matter."""
        return self.kl_coef != 0.0 or self.kl_target is not None

    @property
    def kl_in_reward(self) -> bool:
        return self.needs_reference and self.kl_placement == "in_reward"

    @property
    def entropy_needs_grad(self) -> bool:
        """The entropy is always logged; it enters the graph only when a bonus is paid on it."""
        return self.entropy_coef != 0.0

    @property
    def critic_loss_agg(self) -> str:
        """The value loss weighs every token the same, whatever the policy's aggregation."""
        return "token-mean"

    @property
    def norm_length(self) -> int | None:
        """Dr.GRPO's constant L for seq-mean-token-sum-norm (None: the minibatch's longest response)."""
        return self.max_new_tokens if self.norm_by_max_new_tokens else None

    def needs_old_logprobs(self, updates_per_step: int) -> bool:
        """Log-probs of the sampling policy must be computed before the first update whenever a step
        makes more than one optimiser update: every update after the first trains on samples from a
        policy that has since moved, and only the stored log-probs give it the true ratio π/π_old.
        The KL in the reward needs them too (it is measured on the sampling policy), and so does a
        trust-region step, whose line search compares surrogates of π_new / π_old."""
        return updates_per_step > 1 or self.kl_in_reward or self.trust_region  # the line search compares π_new/π_old

    def length_penalty(self, response_lengths: torch.Tensor) -> torch.Tensor:
        """DAPO's overlong punishment added to each score (zero unless overlong_buffer > 0). [B] -> [B]."""
        return shaping.overlong_penalty(
            response_lengths, self.max_new_tokens, self.overlong_buffer, self.overlong_penalty
        )

    def token_rewards(
        self,
        scores: torch.Tensor,
        mask: torch.Tensor,
        step_rewards: torch.Tensor | None,
        logp: torch.Tensor | None,
        ref_logp: torch.Tensor | None,
        kl_coef: float,
        length_penalty: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token rewards [B, T]: the score on the last token (or the step rewards plus the length
        penalty on the last token), minus β·KL_t when the KL is placed in the reward."""
        penalty = kl.estimate(logp, ref_logp, self.kl_estimator) if self.kl_in_reward and ref_logp is not None else None
        return shaping.token_level_rewards(scores, mask, step_rewards, penalty, kl_coef, length_penalty)

    def advantages(self, inputs: AdvantageInputs) -> Advantages:
        """(advantages [B] or [B, T], returns [B, T] or None) for a scored batch."""
        return ADVANTAGE_ESTIMATORS.get(self.advantage).fn(inputs, self)

    def next_kl_coef(self, kl_coef: float, measured_kl: float, n_samples: int) -> float:
        """β for the next step: fixed, or moved towards ``kl_target`` by the adaptive controller."""
        if self.kl_target is None:
            return kl_coef
        return kl.adaptive_kl_coef(kl_coef, measured_kl, self.kl_target, self.kl_horizon, n_samples)

    def totals(self, tokens: float, sequences: float, longest: float) -> ops.AggregationTotals:
        """The aggregation denominators of a minibatch from its counts over all ranks."""
        return ops.AggregationTotals(tokens, sequences, float(self.norm_length or longest))

    def loss(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_logp: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        kl_coef: float | None = None,
        totals: ops.AggregationTotals | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """loss = policy_loss + β·agg(KL(π‖π_ref)) [if in the loss] − c_ent·agg(entropy); one aggregation for all.

        logp, old_logp, mask, ref_logp, entropy: [B, T]; advantages [B] or [B, T]. ``totals``: the
        minibatch's denominators (over all micro-batches and ranks), so that this part's loss is its
        exact share; None when these rows are the whole minibatch. ``token_weights`` [B, T]: the
        rollout mismatch correction's per-token weights on the policy term (None: all 1). Returns the scalar loss and
        detached stats (``loss/policy``, ``clip_frac``, ``approx_kl``, ``kl``, ``entropy``), means over these rows.
        """
        beta = self.kl_coef if kl_coef is None else kl_coef
        if totals is None:
            totals = ops.AggregationTotals.of(mask, self.norm_length)
        policy_loss, stats = POLICY_LOSSES.get(self.policy_loss)(
            logp, old_logp, advantages, mask, clip_low=self.clip_low, clip_high=self.clip_high, agg=self.loss_agg,
            totals=totals, dual_clip=self.dual_clip, token_weights=token_weights,
        )  # fmt: skip
        stats = {"loss/policy": policy_loss.detach(), **stats}
        total = policy_loss
        if ref_logp is not None:
            kl_per_token = kl.estimate(logp, ref_logp, self.kl_estimator)
            if not self.kl_in_reward:
                total = total + beta * ops.aggregate(kl_per_token, mask, self.loss_agg, totals=totals)
            stats["kl"] = ops.masked_mean(kl_per_token.detach(), mask)
        if entropy is not None:
            if self.entropy_coef:
                total = total - self.entropy_coef * ops.aggregate(entropy, mask, self.loss_agg, totals=totals)
            stats["entropy"] = ops.masked_mean(entropy.detach(), mask)
        return total, stats

    def critic_loss(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        mask: torch.Tensor,
        totals: ops.AggregationTotals | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """vf_coef · value_loss(V, V_old, R); values, old_values, returns, mask [B, T]; ``totals`` as in ``loss``."""
        loss, stats = VALUE_LOSSES.get(self.value_loss)(
            values, old_values, returns, mask, self.value_clip, self.critic_loss_agg, totals=totals
        )
        return self.vf_coef * loss, {"loss/value": loss.detach(), **stats}


__all__ = [
    "ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "VALUE_LOSSES", "AdvantageInputs", "Algorithm", "Estimator",
    "adv", "kl", "losses", "ops", "shaping",
]  # fmt: skip
