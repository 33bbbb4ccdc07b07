"""Masked tensor operations shared by the advantage estimators and the losses.

Shapes: B sequences, T response tokens; ``mask`` is 1 for real response tokens and 0 for padding.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class AggregationTotals:
    """The denominators of one minibatch's aggregation, counted over ALL of its rows: every
    micro-batch, on every rank. A micro-batch's loss divided by these is its exact share of the
    minibatch loss, so the shares sum to the loss of the whole minibatch whatever the layout."""

    tokens: float  # Σ mask: valid response tokens in the minibatch
    sequences: float  # rows in the minibatch
    length: float  # L of seq-mean-token-sum-norm

    @classmethod
    def of(cls, mask: torch.Tensor, norm_length: int | None = None) -> AggregationTotals:
        """Totals of one tensor that holds the whole minibatch; L defaults to its padded length T."""
        return cls(float(mask.sum()), float(mask.shape[0]), float(norm_length or mask.shape[-1]))


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    norm_length: int | None = None,
    totals: AggregationTotals | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar. With N = totals.tokens, S = totals.sequences and
    L = totals.length (all of them counted over the whole minibatch, on every rank):

    token-mean:               Σ_{i,t} l·m / N                       (every token weighs the same; DAPO)
    seq-mean-token-mean:      Σ_i ( Σ_t l·m / Σ_t m ) / S           (every sequence weighs the same; GRPO paper)
    seq-mean-token-sum:       Σ_{i,t} l·m / S
    seq-mean-token-sum-norm:  Σ_{i,t} l·m / (S · L)                 (Dr.GRPO: a constant L)

    Each form is a sum over rows divided by a constant of the minibatch, so the values of disjoint
    parts of a minibatch (micro-batches, ranks) add up exactly to the value of the whole.
    Without ``totals`` the rows given are the whole minibatch (L = ``norm_length``, default T).
    """
    mask = mask.to(loss.dtype)
    if totals is None:
        totals = AggregationTotals.of(mask, norm_length)
    if mode == "token-mean":
        return masked_sum(loss, mask) / max(totals.tokens, 1.0)
    if mode == "seq-mean-token-mean":
        return (masked_sum(loss, mask, dim=-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(totals.sequences, 1.0)
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask) / max(totals.sequences, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return masked_sum(loss, mask) / max(totals.sequences * totals.length, 1.0)
    raise KeyError(f"unknown loss aggregation {mode!r}; known: {list(AGGREGATIONS)}")
