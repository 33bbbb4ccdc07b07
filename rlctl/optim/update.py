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
    minibatches of ``layout.minibatch_size`` rows. Inside a minibatch the rows keep the batch's
    order (its loss does not depend on it), so a group's completions stay next to each other and
    share their prompt's forward pass in a micro-batch."""
    for _ in range(layout.num_iterations):
        order = torch.randperm(batch.size)
        for start in range(0, batch.size, layout.minibatch_size):
            yield batch.rows(order[start : start + layout.minibatch_size].sort().values)


def row_groups(lengths: list[tuple[int, int]], size: int, max_tokens: int = 0) -> list[list[int]]:
    """Which rows go into each micro-batch. lengths: each row's (prompt, response) tokens.

    max_tokens = 0: consecutive runs of ``size`` rows. max_tokens > 0: rows sorted by length and
    taken while the micro-batch's padded size, rows × (longest prompt + longest response), stays
    within ``max_tokens`` (a row longer than that goes alone), so rows of like length share a
    micro-batch and little compute goes to padding. Under several processes every rank gets the
    same number of micro-batches (its largest ones split), as ZeRO-3 gathers weights per forward.
    """
    if max_tokens <= 0:
        groups = [list(range(start, min(start + size, len(lengths)))) for start in range(0, len(lengths), size)]
    else:
        order = sorted(range(len(lengths)), key=lambda i: (sum(lengths[i]), i))
        groups, current, prompt, response = [], [], 0, 0
        for i in order:
            wider = (max(prompt, lengths[i][0]), max(response, lengths[i][1]))
            if current and (len(current) + 1) * sum(wider) > max_tokens:
                groups.append(current)
                current, wider = [], lengths[i]
            current.append(i)
            prompt, response = wider
        if current:
            groups.append(current)
    # Fixed-size groups are as many on every rank (its rows are); only budgets need agreeing on.
    wanted = int(max_over_ranks(float(len(groups)))) if max_tokens > 0 else len(groups)
    while len(groups) < wanted:  # rows per rank are equal, so there are enough rows to split
        largest = max(range(len(groups)), key=lambda g: len(groups[g]))
        group = groups.pop(largest)
        groups[largest:largest] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return groups


def row_lengths(batch: Batch) -> list[tuple[int, int]]:
    """(prompt tokens, response tokens) of every row; a multi-turn response's observations count (they
    are attended in the forward pass, though not trained)."""
    split = batch.input_ids.shape[1] - batch.response_length
    prompt, response = batch.attention_mask[:, :split].sum(dim=1), batch.attention_mask[:, split:].sum(dim=1)
    return list(zip(prompt.tolist(), response.tolist()))


def micro_batches(batch, size: int, max_tokens: int = 0) -> Iterator:
    """The micro-batches of ``batch`` (:func:`row_groups`); a rollout batch's are trimmed of the
    columns that are padding in all of their rows."""
    if not isinstance(batch, Batch):  # the offline stages' rows: fixed slices, as they come
        for start in range(0, batch.size, size):
            yield batch.rows(torch.arange(start, min(start + size, batch.size)))
        return
    for group in row_groups(row_lengths(batch), size, max_tokens):
        yield batch.rows(torch.tensor(group, dtype=torch.long)).trimmed()


def padding_fraction(batch: Batch, size: int, max_tokens: int = 0) -> tuple[float, float]:
    """Share of the tokens of a forward pass that are padding: (fixed micro-batches of ``size`` rows
    at the batch's full width, as before token budgets; the micro-batches ``max_tokens`` gives)."""
    lengths = row_lengths(batch)
    real = sum(p + r for p, r in lengths)
    full = batch.size * batch.input_ids.shape[1]
    used = 0
    for group in row_groups(lengths, size, max_tokens):
        used += len(group) * (max(lengths[i][0] for i in group) + max(max(lengths[i][1] for i in group), 1))
    return 1 - real / max(full, 1), 1 - real / max(used, 1)


def minibatch_counts(response_mask: torch.Tensor) -> tuple[float, float, float]:
    """(valid tokens, sequences, longest response) of a minibatch over all ranks: the inputs of
    ``Algorithm.totals``. Collective: every rank calls it once per minibatch."""
    tokens, sequences = sum_over_ranks([float(response_mask.sum()), float(response_mask.shape[0])])
    longest = max_over_ranks(float(response_mask.sum(dim=1).max()) if response_mask.numel() else 0.0)
    return tokens, sequences, longest


def accumulate(
    engine, minibatch: Batch, micro_batch_size: int, loss_fn: LossFn, max_tokens: int = 0
) -> dict[str, float]:
    """Backward of ``loss_fn`` over the minibatch's micro-batches; the gradient of the whole
    minibatch is left in the engine. ``loss_fn(micro)`` returns (the micro-batch's share of the
    minibatch loss, detached stats).

    Stats: ``loss/*`` entries are shares and are summed (times the number of ranks, so that their
    mean over ranks is the minibatch loss); the others are means over the micro-batch (its tokens,
    or its pairs) and are averaged weighted by ``stat_weight``.
    """
    sums: dict[str, float] = {}
    weight_total = minibatch.stat_weight or 1.0
    for micro in micro_batches(minibatch, micro_batch_size, max_tokens):
        loss, stats = loss_fn(micro)
        engine.backward(loss)
        weight = micro.stat_weight / weight_total
        for key, value in stats.items():
            share = key.startswith("loss/")
            sums[key] = sums.get(key, 0.0) + float(value) * (engine.world_size if share else weight)
    return sums


def update(
    engine, minibatch: Batch, micro_batch_size: int, loss_fn: LossFn, max_tokens: int = 0
) -> tuple[float, dict[str, float]]:
    """One optimiser update of ``engine`` on one minibatch: accumulate, then clip and step.
    Returns (the pre-clip gradient norm, non-finite when the update was skipped; the stats)."""
    stats = accumulate(engine, minibatch, micro_batch_size, loss_fn, max_tokens)
    return engine.step(), stats
