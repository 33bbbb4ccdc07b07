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
