"""Log-probabilities of the response tokens under a model (policy or reference)."""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def _separate_head(model):
    """The LM head to apply to the last hidden states, or None where the model's own logits must be
    used: ZeRO-3 (its partitioned weights are gathered only inside the model's forward)."""
    module = getattr(model, "module", model)  # DDP and DeepSpeed wrap the model
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is None or any(hasattr(p, "ds_id") for p in head.parameters()):
        return None
    return head


def _chunk_logprobs(hidden, targets, head, temperature: float, with_entropy: bool, entropy_grad: bool):
    logits = head(hidden).float()  # [n, V]: the only full-vocabulary tensor, one chunk long
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    normaliser = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if not with_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        # H = logsumexp(z) − Σ_v softmax(z)_v · z_v
        entropy = normaliser - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def token_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head, temperature: float = 1.0,
    with_entropy: bool = False, entropy_grad: bool = False, chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """log π(y) = z_y − logsumexp(z) and H(π) = logsumexp(z) − Σ_v π_v z_v, with z = head(h) / temperature.

    hidden [B, T, H] (the states that predict the targets), targets [B, T] -> logp [B, T], entropy
    [B, T] or None. The head runs on ``chunk_tokens`` tokens at a time, in the compute dtype (the
    logits are upcast to fp32 a chunk at a time), and under gradients each chunk is recomputed in
    the backward pass, so no [B, T, V] tensor is ever held: memory is one chunk's logits.
    """
    shape = targets.shape
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    step = chunk_tokens if chunk_tokens > 0 else max(flat_targets.numel(), 1)
    logps, entropies = [], []
    for start in range(0, flat_targets.numel(), step):
        args = (flat_hidden[start : start + step], flat_targets[start : start + step], head, temperature,
                with_entropy, entropy_grad)  # fmt: skip
        if torch.is_grad_enabled() and flat_hidden.requires_grad:
            logp, entropy = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).reshape(shape)
    return logp, (torch.cat(entropies).reshape(shape) if with_entropy else None)


def last_states(model, input_ids, attention_mask, position_ids, keep: int):
    """(states [B, keep, ·], head) with head(states) = the model's logits at the last ``keep`` positions.

    Normally the final hidden states and the LM head, so the caller can apply the head a chunk at a
    time. The model's own logits and an identity head where the head alone is not the map: under
    ZeRO-3, or when the model changes its logits after the head (soft-capping, scaling), which shows
    as the last position's logits differing from the head's.
    """
    head = _separate_head(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=1 if head is not None else keep, use_cache=False,
                output_hidden_states=head is not None)  # fmt: skip
    if head is not None:
        hidden = out.hidden_states[-1]
        with torch.no_grad():
            plain = torch.allclose(head(hidden[:, -1:]).float(), out.logits[:, -1:].float(), rtol=1e-3, atol=1e-3)
        if plain:
            return hidden[:, -keep:], head
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=keep, use_cache=False)  # fmt: skip
    return out.logits, torch.nn.Identity()


def response_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
    temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False, chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """log π(y_t | x, y_<t) for the last T = response_length tokens, and the entropy of π there.

    input_ids, attention_mask: [B, L] -> logp [B, T], entropy [B, T] or None.
    Logits are divided by the sampling temperature so the scored distribution is the one sampled.
    The entropy is differentiable only with ``entropy_grad``.
    Only the last T+1 positions go through the LM head (the prompt's logits are never needed), a
    chunk at a time (:func:`token_logprobs`). A model whose forward changes the logits after the head
    (soft-capping, scaling: the last position's logits differ from the head's) is scored from its own
    logits instead, as is a ZeRO-3 model.
    Position ids follow the attention mask, as in generation, so left padding does not shift them.
    """
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    states, head = last_states(model, input_ids, attention_mask, position_ids, response_length + 1)
    return token_logprobs(states[:, :-1], input_ids[:, -response_length:], head, temperature, with_entropy,
                          entropy_grad, chunk_tokens)  # fmt: skip


def response_values(
    critic, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> torch.Tensor:
    """V(s_t) for each response token t, where s_t is the prompt and y_<t: the critic's output at
    the position that predicts y_t (the same positions as the log-probs). [B, L] -> [B, T]."""
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    values = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return values[:, -response_length - 1 : -1]


def score_in_chunks(fn, model, batch, chunk_size: int, autocast, max_tokens: int = 0) -> torch.Tensor:
    """``fn(model, input_ids, attention_mask, response_length)`` over the batch's micro-batches
    (``chunk_size`` rows, or ``max_tokens`` padded tokens each, trimmed of common padding), without
    gradients, under ``autocast``; each micro-batch's [b, T'] result put back in its rows of [B, T]
    (0 past T', which is padding)."""
    from rlctl.optim.update import row_groups, row_lengths

    out = None
    with torch.no_grad():
        for group in row_groups(row_lengths(batch), chunk_size, max_tokens):
            rows = torch.tensor(group, dtype=torch.long)
            micro = batch.rows(rows).trimmed()
            with autocast():
                scores = fn(model, micro.input_ids, micro.attention_mask, micro.response_length)
            if out is None:
                out = scores.new_zeros(batch.size, batch.response_length)
            out[rows, : scores.shape[1]] = scores
    return out


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


def target_logprobs(
    model, input_ids, attention_mask, position_ids, loss_mask, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_{t+1} | x_≤t) of the tokens from the first one the loss covers, and which of them it covers.

    input_ids, position_ids, loss_mask: [B, L]; attention_mask [B, L] or None (packed rows)
    -> (logp [B, K], mask [B, K]) over the last K target tokens, K = L − (first covered position):
    logp[:, k] scores token L − K + k from the position before it, mask[:, k] = loss_mask there.
    Positions before the first covered token (prompts) never go through the LM head, and the head
    runs a chunk of tokens at a time (:func:`token_logprobs`).
    """
    covered = loss_mask.sum(dim=0).nonzero()
    first = int(covered[0]) if len(covered) else input_ids.shape[1] - 1
    first = max(first, 1)  # the first token of a row has no position before it to score it from
    keep = input_ids.shape[1] - first
    states, head = last_states(model, input_ids, attention_mask, position_ids, keep + 1)
    logp, _ = token_logprobs(states[:, :-1], input_ids[:, first:], head, chunk_tokens=chunk_tokens)
    return logp, loss_mask[:, first:]
