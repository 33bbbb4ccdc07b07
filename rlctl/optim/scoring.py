"""Log-probabilities of the response tokens under a model (policy or reference)."""

from __future__ import annotations

import torch


def response_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
    temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """log π(y_t | x, y_<t) for the last T = response_length tokens, and the entropy of π there.

    input_ids, attention_mask: [B, L] -> logp [B, T], entropy [B, T] or None.
    Logits are divided by the sampling temperature so the scored distribution is the one sampled.
    The entropy is differentiable only with ``entropy_grad``.
    Only the last T+1 positions go through the LM head (the prompt's logits are never needed).
    Position ids follow the attention mask, as in generation, so left padding does not shift them.
    """
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=response_length + 1, use_cache=False,
    )  # fmt: skip
    logits = out.logits[:, :-1].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, -response_length:]
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:  # kept out of the graph unless an entropy bonus needs its gradient
        source = log_probs if entropy_grad else log_probs.detach()
        entropy = -(source.exp() * source).sum(-1)
    return logp, entropy


def response_values(
    critic, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> torch.Tensor:
    """V(s_t) for each response token t, where s_t is the prompt and y_<t: the critic's output at
    the position that predicts y_t (the same positions as the log-probs). [B, L] -> [B, T]."""
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    values = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return values[:, -response_length - 1 : -1]


def score_in_chunks(fn, model, batch, chunk_size: int, autocast) -> torch.Tensor:
    """``fn(model, input_ids, attention_mask, response_length)`` over the batch ``chunk_size`` rows at a
    time, without gradients, under ``autocast``; the chunks' [b, T] results concatenated to [B, T]."""
    out = []
    with torch.no_grad():
        for start in range(0, batch.size, chunk_size):
            rows = slice(start, start + chunk_size)
            with autocast():
                out.append(fn(model, batch.input_ids[rows], batch.attention_mask[rows], batch.response_length))
    return torch.cat(out)


def pad_rows(ids: list[list[int]], masks: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded rows -> (input_ids, attention_mask, position_ids, loss_mask), each [B, longest]."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    loss_mask = torch.zeros((len(ids), width), dtype=torch.float32)
    for i, (row, mask) in enumerate(zip(ids, masks)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        loss_mask[i, : len(row)] = torch.tensor(mask, dtype=torch.float32)
    positions = torch.arange(width).expand(len(ids), width)
    return input_ids, attention, positions, loss_mask


def pack_rows(ids: list[list[int]], masks: list[list[int]], max_tokens: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Sequences concatenated into rows of at most ``max_tokens`` (first fit, in order), each
    sequence's positions starting at 0 again: (input_ids, None, position_ids, loss_mask) [R, width].
    With no attention mask, transformers reads the restarting positions as separate sequences and
    keeps attention inside each one, so a packed row computes what the sequences would alone."""
    rows: list[list[int]] = []
    for index, row in enumerate(ids):
        for packed in rows:
            if sum(len(ids[i]) for i in packed) + len(row) <= max_tokens:
                packed.append(index)
                break
        else:
            rows.append([index])
    width = max(sum(len(ids[i]) for i in packed) for packed in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for r, packed in enumerate(rows):
        start = 0
        for i in packed:
            n = len(ids[i])
            input_ids[r, start : start + n] = torch.tensor(ids[i])
            positions[r, start : start + n] = torch.arange(n)
            loss_mask[r, start : start + n] = torch.tensor(masks[i], dtype=torch.float32)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the padding: one more sequence, never trained
    return input_ids, None, positions, loss_mask


def target_logprobs(model, input_ids, attention_mask, position_ids, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_{t+1} | x_≤t) of the tokens from the first one the loss covers, and which of them it covers.

    input_ids, position_ids, loss_mask: [B, L]; attention_mask [B, L] or None (packed rows)
    -> (logp [B, K], mask [B, K]) over the last K target tokens, K = L − (first covered position):
    logp[:, k] scores token L − K + k from the position before it, mask[:, k] = loss_mask there.
    Positions before the first covered token (prompts) never go through the LM head, and
    log π is logit − logsumexp(logits), so no [B, K, V] log-softmax is kept beside the logits.
    """
    covered = loss_mask.sum(dim=0).nonzero()
    first = int(covered[0]) if len(covered) else input_ids.shape[1] - 1
    first = max(first, 1)  # the first token of a row has no position before it to score it from
    keep = input_ids.shape[1] - first
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=keep + 1, use_cache=False)  # fmt: skip
    logits = out.logits[:, :-1].float()
    targets = input_ids[:, first:]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, loss_mask[:, first:]
