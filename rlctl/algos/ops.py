"""Masked tensor operations shared by the advantage estimators and the losses.

Shapes: B sequences, T response tokens; ``mask`` is 1 for real response tokens and 0 for padding.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask over ``dim`` (all elements when None)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask over ``dim``; an all-masked slice gives 0, not NaN."""
    mask = mask.to(x.dtype)
    return (
        masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)
        if dim is not None
        else masked_sum(x, mask) / mask.sum().clamp(min=1.0)
    )


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of x; Bessel-corrected when ``unbiased`` and there are ≥ 2 entries."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over valid entries; masked entries are returned as 0.

    With ``shift_mean=False`` the mean is added back (only the scale is normalised).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean:               Σ_{i,t} l·m / Σ_{i,t} m             (every token weighs the same; DAPO)
    seq-mean-token-mean:      mean_i ( Σ_t l·m / Σ_t m )           (every sequence weighs the same; GRPO paper)
    seq-mean-token-sum:       mean_i ( Σ_t l·m )
    seq-mean-token-sum-norm:  Σ_{i,t} l·m / (B · L)                (Dr.GRPO: a constant L, default T)
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        return masked_mean(loss, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum-norm":
        length = norm_length if norm_length is not None else loss.shape[-1]
        return masked_sum(loss, mask) / (loss.shape[0] * length)
    raise KeyError(f"unknown loss aggregation {mode!r}; known: {list(AGGREGATIONS)}")


def micro_batch_weight(micro_mask: torch.Tensor, minibatch_mask: torch.Tensor, mode: str) -> float:
    """Factor w such that Σ_micro w·aggregate(micro) == aggregate(minibatch) for ``mode``.

    token-mean weighs by token count; the sequence-level modes by sequence count.
    """
    if mode == "token-mean":
        return float(micro_mask.sum() / minibatch_mask.sum().clamp(min=1))
    if mode in AGGREGATIONS:
        return micro_mask.shape[0] / minibatch_mask.shape[0]
    raise KeyError(f"unknown loss aggregation {mode!r}; known: {list(AGGREGATIONS)}")
