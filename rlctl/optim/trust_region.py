"""The optimisation stage's second kind of update: TRPO's trust-region step on one engine.

It builds, from the engine and a minibatch, the operations :func:`rlctl.algos.trust_region.trust_region_step`
needs — the minibatch gradient (accumulated over micro-batches like any update), Fisher-vector
products (the double backward of the mean full-vocabulary KL on a share of the samples) and "set
θ = θold + Δ, measure the loss and the KL" — and assigns the accepted parameters. Only trainable
parameters take part (with LoRA, the adapter's)."""

from __future__ import annotations

import math
import time

import torch

from rlctl.algos.trust_region import TrustRegionSpec, trust_region_step
from rlctl.batch import Batch
from rlctl.optim.update import LossFn, accumulate, micro_batches


def full_log_probs(model, batch: Batch, temperature: float) -> torch.Tensor:
    """log π(· | x, y_<t) over the whole vocabulary at each response position. -> [B, T, V] (fp32).
    Attention runs on the math kernel: the fused ones have no second derivative (F·v needs it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = batch.response_length
    positions = (batch.attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    with sdpa_kernel([SDPBackend.MATH]):
        # only the positions that predict response tokens go through the LM head (and its double backward)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                       logits_to_keep=t + 1).logits  # fmt: skip
    return torch.log_softmax(logits[:, -t - 1 : -1].float() / temperature, dim=-1)


def kl_sum(old_log_probs: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over trained tokens of KL(π_old ‖ π) = Σ_v π_old(v) (log π_old(v) − log π(v)).
    old_log_probs, log_probs [B, T, V], mask [B, T] -> scalar."""
    per_token = (old_log_probs.exp() * (old_log_probs - log_probs)).sum(dim=-1)
    return (per_token * mask.to(per_token.dtype)).sum()


def fisher_vector_product(kl: torch.Tensor, params: list[torch.Tensor]):
    """v ↦ F·v with F = ∇²kl at the current parameters, by double backward: the first derivative of
    ``kl`` (a scalar whose value and gradient are 0 there, as KL(π_θold ‖ π_θ) at θ = θold) is kept
    with its graph, and each product is the derivative of (∇kl)·v. v [n] -> [n] (n = trainable numbers)."""
    first = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params, create_graph=True)])

    def product(v: torch.Tensor) -> torch.Tensor:
        second = torch.autograd.grad(torch.dot(first, v.to(first.dtype)), params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in second]).float()

    return product


def fisher_row_count(size: int, fraction: float) -> int:
    """How many of a minibatch's ``size`` samples the Fisher products use: a share, at least one."""
    return max(1, round(fraction * size))


def fisher_rows(size: int, fraction: float) -> torch.Tensor:
    """The rows the Fisher products use: a random ``fraction`` of the minibatch, from the global RNG,
    so a resumed run draws the same ones."""
    return torch.randperm(size)[: fisher_row_count(size, fraction)].sort().values


def trust_region_update(
    engine, minibatch: Batch, micro_batch_size: int, loss_fn: LossFn, max_tokens: int = 0, *,
    spec: TrustRegionSpec, fisher_fraction: float, temperature: float,
) -> tuple[float, dict[str, float]]:  # fmt: skip
    """One TRPO step of ``engine`` on one minibatch. Returns (the gradient norm, non-finite when the
    step was skipped; the loss stats and trpo/* metrics), as :func:`rlctl.optim.update.update` does.

    The measured KL a step must keep within δ: the exact full-vocabulary mean KL on the Fisher rows;
    when those are a share of the minibatch, also the sampled estimate (k3) over every trained token,
    so that a step cannot move the rows the Fisher products did not see. With several processes
    (``engine.sum_over_ranks``, a :class:`rlctl.optim.engine.ReplicaEngine`), g, every F·v, the losses and the KL sums are summed over ranks, so
    every rank takes the step one process would take on the whole minibatch."""
    model = engine.model
    over_ranks = engine.sum_over_ranks
    params = [p for p in model.parameters() if p.requires_grad]
    clock = time.perf_counter()
    stats = accumulate(engine, minibatch, micro_batch_size, loss_fn, max_tokens)
    gradient = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).float()
    for p in params:
        p.grad = None
    gradient = over_ranks(gradient)  # each rank's backward was of its share of the minibatch loss
    # accumulate counts a rank's loss share × world size (its mean over ranks is the loss); the sum of shares is.
    loss_before = float(over_ranks(torch.tensor(stats["loss/total"] / engine.world_size, dtype=torch.float64)))
    grad_norm = float(gradient.norm())
    if not math.isfinite(grad_norm):
        return grad_norm, stats
    seconds = {"trpo/time_gradient_s": time.perf_counter() - clock, "trpo/time_fisher_cg_s": 0.0,
               "trpo/time_line_search_s": 0.0}  # fmt: skip

    # F·v: the Hessian of the mean KL(π_θold ‖ π_θ) at θold on the Fisher rows, by double backward.
    clock = time.perf_counter()
    fisher = minibatch.rows(fisher_rows(minibatch.size, fisher_fraction)).trimmed()
    every_row = fisher.size == minibatch.size
    fisher_tokens = float(over_ranks(fisher.response_mask.sum().double()))
    with engine.autocast():
        log_probs = full_log_probs(model, fisher, temperature)
    old_log_probs = log_probs.detach()
    start = [p.detach().clone() for p in params]
    # this rank's share of the mean over all ranks' Fisher tokens: the shares' Hessians sum to F
    kl_share = kl_sum(old_log_probs, log_probs, fisher.response_mask) / max(fisher_tokens, 1.0)
    fisher_vector = fisher_vector_product(kl_share, params)
    seconds["trpo/time_fisher_cg_s"] += time.perf_counter() - clock

    def timed_fisher_vector(v: torch.Tensor) -> torch.Tensor:
        clock = time.perf_counter()
        product = over_ranks(fisher_vector(v))
        seconds["trpo/time_fisher_cg_s"] += time.perf_counter() - clock
        return product

    measured = {"kl_fisher_rows": 0.0, "kl_sampled": 0.0}  # of the last try: the accepted one, if any

    @torch.no_grad()
    def try_step(delta: torch.Tensor | None) -> tuple[float, float]:
        clock = time.perf_counter()
        try:
            return _set_and_measure(delta)
        finally:
            seconds["trpo/time_line_search_s"] += time.perf_counter() - clock

    def _set_and_measure(delta: torch.Tensor | None) -> tuple[float, float]:
        offset = 0
        for p, p0 in zip(params, start):
            if delta is None:
                p.copy_(p0)
            else:
                p.copy_(p0 + delta[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        if delta is None:
            return 0.0, 0.0
        loss, sampled_kl, tokens = 0.0, 0.0, 0.0
        for micro in micro_batches(minibatch, micro_batch_size, max_tokens):
            micro_loss, micro_stats = loss_fn(micro)
            loss += float(micro_loss)
            sampled_kl += float(micro_stats["sampled_kl"]) * micro.stat_weight
            tokens += micro.stat_weight
        with engine.autocast():
            fisher_kl = kl_sum(old_log_probs, full_log_probs(model, fisher, temperature), fisher.response_mask)
        loss, sampled_kl, tokens, fisher_kl = over_ranks(
            torch.tensor([loss, sampled_kl, tokens, float(fisher_kl)], dtype=torch.float64)).tolist()  # fmt: skip
        measured["kl_fisher_rows"] = fisher_kl / max(fisher_tokens, 1.0)
        measured["kl_sampled"] = sampled_kl / max(tokens, 1.0)
        kl = measured["kl_fisher_rows"] if every_row else max(measured["kl_fisher_rows"], measured["kl_sampled"])
        return loss, kl

    result = trust_region_step(gradient, timed_fisher_vector, try_step, loss_before, spec)
    if result.step_fraction > 0:
        engine.weights_version += 1
    else:
        measured.update(kl_fisher_rows=0.0, kl_sampled=0.0)
    stats.update({
        "trpo/kl": result.kl, "trpo/kl_fisher_rows": measured["kl_fisher_rows"],
        "trpo/kl_sampled": measured["kl_sampled"], "trpo/step_fraction": result.step_fraction,
        "trpo/surrogate_gain": result.surrogate_gain, "trpo/expected_gain": result.expected_gain,
        "trpo/cg_residual": result.cg_residual, "trpo/rejected_steps": float(result.rejected_steps),
        "trpo/improvement_ratio": result.surrogate_gain / result.expected_gain if result.expected_gain > 0 else 0.0,
        **seconds,
    })  # fmt: skip
    return grad_norm, stats
