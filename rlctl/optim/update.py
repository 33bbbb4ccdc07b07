"""The optimisation stage's loops, shared by the policy and the critic: shuffled minibatches over a
step's samples, micro-batches inside each, and "update one engine with this loss".

Exactness under every layout rests on one rule: a micro-batch's loss is its SHARE of the minibatch
loss, divided by denominators counted once per minibatch over all of its rows on all ranks
(``minibatch_totals``). Shares add up over micro-batches (gradient accumulation) and over ranks
(the engine sums the ranks' gradients), so one rank with one micro-batch and any other split of
the same minibatch give the same loss and the same gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rlctl.batch import Batch
from rlctl.distributed import max_over_ranks, sum_over_ranks
from rlctl.optim.layout import BatchLayout

LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def minibatches(batch: Batch, layout: BatchLayout) -> Iterator[Batch]:
    """``num_iterations`` passes, each over the step's samples in a fresh random order, cut into
    minibatches of ``layout.minibatch_size`` rows."""
    for _ in range(layout.num_iterations):
        order = torch.randperm(batch.size)
        for start in range(0, batch.size, layout.minibatch_size):
            yield batch.rows(order[start : start + layout.minibatch_size])


def micro_batches(batch: Batch, size: int) -> Iterator[Batch]:
    """Consecutive slices of ``size`` rows (the last may be shorter)."""
    for start in range(0, batch.size, size):
        yield batch.rows(torch.arange(start, min(start + size, batch.size)))


def minibatch_counts(response_mask: torch.Tensor) -> tuple[float, float, float]:
    """(valid tokens, sequences, longest response) of a minibatch over all ranks: the inputs of
    ``Algorithm.totals``. Collective: every rank calls it once per minibatch."""
    tokens, sequences = sum_over_ranks([float(response_mask.sum()), float(response_mask.shape[0])])
    longest = max_over_ranks(float(response_mask.sum(dim=1).max()) if response_mask.numel() else 0.0)
    return tokens, sequences, longest


def accumulate(engine, minibatch: Batch, micro_batch_size: int, loss_fn: LossFn) -> dict[str, float]:
    """Backward of ``loss_fn`` over the minibatch's micro-batches; the gradient of the whole
    minibatch is left in the engine. ``loss_fn(micro)`` returns (the micro-batch's share of the
    minibatch loss, detached stats).

    Stats: ``loss/*`` entries are shares and are summed (times the number of ranks, so that their
    mean over ranks is the minibatch loss); the others are means over the micro-batch (its tokens,
    or its pairs) and are averaged weighted by ``stat_weight``.
    """
    sums: dict[str, float] = {}
    weight_total = minibatch.stat_weight or 1.0
    for micro in micro_batches(minibatch, micro_batch_size):
        loss, stats = loss_fn(micro)
        engine.backward(loss)
        weight = micro.stat_weight / weight_total
        for key, value in stats.items():
            share = key.startswith("loss/")
            sums[key] = sums.get(key, 0.0) + float(value) * (engine.world_size if share else weight)
    return sums


def update(engine, minibatch: Batch, micro_batch_size: int, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
    """One optimiser update of ``engine`` on one minibatch: accumulate, then clip and step.
    Returns (the pre-clip gradient norm, non-finite when the update was skipped; the stats)."""
    stats = accumulate(engine, minibatch, micro_batch_size, loss_fn)
    return engine.step(), stats
