"""TRPO's trust-region step (Schulman et al. 2015), as pure functions of the operations it needs.

With θ the trainable parameters (flattened, n numbers), L(θ) the minibatch loss (the negative
importance-weighted surrogate, L = −agg(π_θ/π_old · A), plus whatever KL or entropy terms the
algorithm adds) and KL̄(θ) = mean over trained tokens of KL(π_θold(·|s) ‖ π_θ(·|s)) over the full
vocabulary, one step solves

    min_Δ  gᵀΔ   subject to   ½ ΔᵀFΔ ≤ δ,      g = ∇L(θold) [n],  F = ∇²KL̄(θold) [n, n]

whose solution is Δ = −√(2δ / dᵀFd) · d with d = F⁻¹g (found by conjugate gradient without ever
forming F, from products F·v), then a backtracking line search: θold + Δ, θold + Δ/2, … until the
measured KL̄ ≤ δ and the loss decreased; if no fraction does, θ stays θold exactly.

Every vector is [n]; ``fisher_vector`` returns F·v (+ damping·v); with several processes the caller's
operations return sums over ranks, so every rank computes the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def conjugate_gradient(
    matrix_vector: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int, tolerance: float = 1e-10
) -> tuple[torch.Tensor, float]:
    """x ≈ A⁻¹b for a symmetric positive-definite A given as x ↦ A·x, by at most ``iterations`` steps
    of conjugate gradient (Hestenes & Stiefel 1952). b [n] -> (x [n], the final residual ‖b − A·x‖).

    r₀ = b, p₀ = r₀;  α = rᵀr / pᵀAp,  x += αp,  r −= αAp,  p = r + (r'ᵀr' / rᵀr) p.
    Stops early when rᵀr < tolerance.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    for _ in range(iterations):
        if rr < tolerance:
            break
        ap = matrix_vector(p)
        alpha = rr / torch.dot(p, ap)
        x += alpha * p
        r -= alpha * ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, float(torch.sqrt(rr))


@dataclass(frozen=True)
class TrustRegionSpec:
    """The ``algo`` keys of the trust-region step."""

    max_kl: float  # δ: the largest mean KL(π_old ‖ π_new) per trained token a step may reach
    cg_iters: int  # conjugate-gradient iterations for F⁻¹g
    cg_damping: float  # added to F (F + damping·I), which keeps CG stable where F is near singular
    line_search_steps: int  # tries of the line search: Δ, Δ/2, …, Δ/2^(steps−1)


@dataclass(frozen=True)
class TrustRegionResult:
    step_fraction: float  # 1, ½, … of the full step that was taken; 0 when every try was rejected
    kl: float  # the measured mean KL after the accepted step (0 when none)
    surrogate_gain: float  # L(θold) − L(θnew): how much the loss fell (0 when no step)
    expected_gain: float  # −gᵀΔ of the taken fraction of the step: the fall the linear model predicts
    cg_residual: float  # ‖g − F·d‖ after CG
    rejected_steps: int  # tries the line search rejected


def trust_region_step(
    gradient: torch.Tensor,
    fisher_vector: Callable[[torch.Tensor], torch.Tensor],
    try_step: Callable[[torch.Tensor | None], tuple[float, float]],
    loss_before: float,
    spec: TrustRegionSpec,
) -> TrustRegionResult:
    """One TRPO step from the minibatch gradient g [n] (of the loss, to be decreased).

    ``fisher_vector(v)`` -> F·v [n] at θold (without damping: added here).
    ``try_step(Δ)`` sets θ = θold + Δ and returns (loss, mean KL) there; ``try_step(None)`` restores
    θold exactly (bitwise) and returns anything.
    """
    damped = lambda v: fisher_vector(v) + spec.cg_damping * v  # noqa: E731
    direction, residual = conjugate_gradient(damped, gradient, spec.cg_iters)
    curvature = float(torch.dot(direction, damped(direction)))  # dᵀFd
    if not math.isfinite(curvature) or curvature <= 0 or not torch.isfinite(gradient).all():
        try_step(None)
        return TrustRegionResult(0.0, 0.0, 0.0, 0.0, residual, spec.line_search_steps)
    full_step = -math.sqrt(2 * spec.max_kl / curvature) * direction  # ½ΔᵀFΔ = δ
    full_gain = -float(torch.dot(gradient, full_step))  # −gᵀΔ ≥ 0
    for tried in range(spec.line_search_steps):
        fraction = 0.5**tried
        loss, kl = try_step(fraction * full_step)
        if math.isfinite(loss) and math.isfinite(kl) and kl <= spec.max_kl and loss < loss_before:
            return TrustRegionResult(fraction, kl, loss_before - loss, fraction * full_gain, residual, tried)
    try_step(None)
    return TrustRegionResult(0.0, 0.0, 0.0, 0.0, residual, spec.line_search_steps)
