"""Log-probabilities of the response tokens under a model (policy or reference)."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.utils.checkpoint

from rlctl.optim.update import row_groups, row_lengths

LOGPROB_CHUNK_TOKENS = 1024  # tokens whose full-vocabulary logits are held at once (memory: one chunk's logits)


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
    with_entropy: bool = False, entropy_grad: bool = False, chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
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


# Whether a model's logits are its LM head applied to its last hidden states (checked once per model).
_HEAD_IS_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def last_states(model, input_ids, attention_mask, position_ids, keep: int):
    """(states [B, keep, ·], head) with head(states) = the model's logits at the last ``keep`` positions
    (``keep`` = 0: every position). ``attention_mask`` is [B, L], or [B, 1, L, L] given as is.

    Normally the final hidden states and the LM head, so the caller can apply the head a chunk at a
    time. The model's own logits and an identity head where the head alone is not the map: under
    ZeRO-3, or when the model changes its logits after the head (soft-capping, scaling), which shows
    as the last position's logits differing from the head's the first time the model is scored.
    """
    head = _separate_head(model)
    module = getattr(model, "module", model)
    if head is not None and _HEAD_IS_PLAIN.get(module, True):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=1, use_cache=False, output_hidden_states=True)  # fmt: skip
        hidden = out.hidden_states[-1]
        if module not in _HEAD_IS_PLAIN:
            with torch.no_grad():
                _HEAD_IS_PLAIN[module] = torch.allclose(
                    head(hidden[:, -1:]).float(), out.logits[:, -1:].float(), rtol=1e-3, atol=1e-3
                )
        if _HEAD_IS_PLAIN[module]:
            return hidden[:, -keep:], head
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=keep, use_cache=False)  # fmt: skip
    return out.logits, torch.nn.Identity()


# A packed row of one prompt and its completions is at most this many times as wide as one
# unshared row: attention's cost grows with the square of the width, the saving only linearly.
MAX_PACK_WIDTH_FACTOR = 4


def _mask_kind(model) -> str | None:
    """How the model's attention takes a custom [B, 1, L, L] mask: ``bool`` (sdpa), ``additive``
    (eager: added to the scores), or None (flash/flex kernels: no arbitrary masks, no sharing)."""
    config = getattr(getattr(model, "module", model), "config", None)
    return {"sdpa": "bool", "eager": "additive"}.get(getattr(config, "_attn_implementation", None))


def prompt_packs(input_ids, attention_mask, response_length: int, max_width: int) -> list[list[int]]:
    """The rows grouped by identical prompt (its attended tokens), each group cut, in row order, into
    packs whose prompt + completions (attended tokens) fit in ``max_width``; a pack holds ≥ 1 row."""
    split = input_ids.shape[1] - response_length
    prompt_mask, response_len = attention_mask[:, :split].bool(), attention_mask[:, split:].sum(1).tolist()
    by_prompt: dict[tuple, list[int]] = {}
    for i in range(input_ids.shape[0]):
        by_prompt.setdefault(tuple(input_ids[i, :split][prompt_mask[i]].tolist()), []).append(i)
    packs = []
    for prompt, rows in by_prompt.items():
        pack, width = [], len(prompt)
        for i in rows:
            if pack and width + response_len[i] > max_width:
                packs.append(pack)
                pack, width = [], len(prompt)
            pack.append(i)
            width += response_len[i]
        packs.append(pack)
    return packs


class PromptPacking(NamedTuple):
    """A micro-batch's rows as packs, one row per pack: [n, W] ids and positions, the [n, 1, W, W]
    mask, and for each response token of the original [B, T] rows the flat index (into n·W) of the
    state that predicts it, and whether the token is real (t < the row's response length)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor  # [B, T] long: index into the [n, keep] states, flattened
    valid: torch.Tensor  # [B, T] bool
    keep: int  # the last ``keep`` columns hold every predicting state (no pack's prompt before them is needed)

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """[n, keep, ...] per packed token (the last ``keep`` columns) -> [B, T, ...] per response
        token (zeros where not valid)."""
        flat = states.reshape(-1, *states.shape[2:])
        picked = flat[self.source.reshape(-1)].reshape(*self.source.shape, *states.shape[2:])
        return picked * self.valid.reshape(*self.valid.shape, *([1] * (states.ndim - 2)))


def pack_by_prompt(input_ids, attention_mask, response_length: int, packs: list[list[int]], kind: str) -> PromptPacking:
    """Each pack of rows with one prompt as one row: the prompt's p tokens at positions 0…p−1, then
    each completion k at positions p…p+r_k−1, under a mask that lets a completion's tokens see the
    prompt and their own earlier tokens only. Every token thus sees what it sees in its own row: the
    same computation, in fewer tokens. Response token t of row i is predicted by the prompt's last
    state (t = 0) or by its own token t−1.

    input_ids, attention_mask [B, L]: left-padded prompts, right-padded responses of T = response_length.
    """
    split = input_ids.shape[1] - response_length
    prompt_mask = attention_mask[:, :split].bool()
    prompt_len, response_len = prompt_mask.sum(1).tolist(), attention_mask[:, split:].sum(1).tolist()
    width = max(prompt_len[pack[0]] + sum(response_len[i] for i in pack) for pack in packs)
    ids = torch.zeros((len(packs), width), dtype=torch.long)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    segment = torch.full((len(packs), width), -1, dtype=torch.long)  # −1 padding, 0 prompt, k completion k
    first = min(prompt_len[pack[0]] for pack in packs) - 1  # the earliest predicting state's column
    keep = width - first
    source = torch.zeros((input_ids.shape[0], response_length), dtype=torch.long)
    for n, pack in enumerate(packs):
        p = prompt_len[pack[0]]
        ids[n, :p] = input_ids[pack[0], :split][prompt_mask[pack[0]]]
        positions[n, :p], segment[n, :p] = torch.arange(p), 0
        start = p
        for k, i in enumerate(pack, start=1):
            r = response_len[i]
            ids[n, start : start + r] = input_ids[i, split : split + r]
            positions[n, start : start + r] = torch.arange(p, p + r)
            segment[n, start : start + r] = k
            source[i, 0] = n * keep + p - 1 - first
            source[i, 1:r] = n * keep + torch.arange(start, start + r - 1) - first
            start += r
    columns = torch.arange(width)
    causal = columns[None, :, None] >= columns[None, None, :]  # [1, query, key]
    same = segment[:, :, None] == segment[:, None, :]
    sees_prompt = (segment[:, None, :] == 0) & (segment[:, :, None] >= 0)
    allowed = (causal & (same | sees_prompt)).unsqueeze(1)  # [n, 1, W, W]; padding sees padding: no empty rows
    mask = (
        allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    )
    valid = torch.arange(response_length)[None, :] < torch.tensor(response_len)[:, None]
    device = input_ids.device
    return PromptPacking(
        ids.to(device), mask.to(device), positions.to(device), source.to(device), valid.to(device), keep
    )


def packing_for(model, input_ids, attention_mask, response_length: int) -> PromptPacking | None:
    """The rows packed by prompt where the model takes a custom mask and some prompt repeats, else None.
    A pack is at most ``MAX_PACK_WIDTH_FACTOR`` times the longest row's attended tokens."""
    kind = _mask_kind(model)
    if kind is None:
        return None
    max_width = MAX_PACK_WIDTH_FACTOR * int(attention_mask.sum(1).max())
    packs = prompt_packs(input_ids, attention_mask, response_length, max_width)
    if len(packs) == input_ids.shape[0]:
        return None
    return pack_by_prompt(input_ids, attention_mask, response_length, packs, kind)


def response_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
    temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False, chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
    share_prompts: bool = False,
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
    With ``share_prompts``, rows with the same prompt (a group's completions) run it once
    (:func:`pack_by_prompt`; the same values, 0 past each row's response) where the model's
    attention takes a custom mask and some prompt repeats.
    """
    packing = packing_for(model, input_ids, attention_mask, response_length) if share_prompts else None
    if packing is not None:
        states, head = last_states(model, packing.input_ids, packing.attention_mask, packing.position_ids, packing.keep)
        logp, entropy = token_logprobs(packing.gather(states), input_ids[:, -response_length:], head, temperature,
                                       with_entropy, entropy_grad, chunk_tokens)  # fmt: skip
        return logp * packing.valid, (entropy * packing.valid if entropy is not None else None)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    states, head = last_states(model, input_ids, attention_mask, position_ids, response_length + 1)
    return token_logprobs(states[:, :-1], input_ids[:, -response_length:], head, temperature, with_entropy,
                          entropy_grad, chunk_tokens)  # fmt: skip


def response_values(
    critic, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int, share_prompts: bool = False
) -> torch.Tensor:
    """V(s_t) for each response token t, where s_t is the prompt and y_<t: the critic's output at
    the position that predicts y_t (the same positions as the log-probs). [B, L] -> [B, T].
    With ``share_prompts`` rows with one prompt run it once, as in :func:`response_logprobs`."""
    packing = packing_for(critic, input_ids, attention_mask, response_length) if share_prompts else None
    if packing is not None:
        return packing.gather(
            critic(packing.input_ids, packing.attention_mask, packing.position_ids)[:, -packing.keep :]
        )
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    values = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return values[:, -response_length - 1 : -1]


def score_in_chunks(fn, model, batch, chunk_size: int, autocast, max_tokens: int = 0) -> torch.Tensor:
    """``fn(model, input_ids, attention_mask, response_length)`` over the batch's micro-batches
    (``chunk_size`` rows, or ``max_tokens`` padded tokens each, trimmed of common padding), without
    gradients, under ``autocast``; each micro-batch's [b, T'] result put back in its rows of [B, T]
    (0 past T', which is padding)."""
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
    model, input_ids, attention_mask, position_ids, loss_mask, chunk_tokens: int = LOGPROB_CHUNK_TOKENS
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
