"""Scoring tokens under a model: the LM head applied a chunk at a time must give exactly what the
full-vocabulary log-softmax gives, values and gradients; gradient checkpointing must not change
gradients either."""

import pytest
import torch

from rlctl.models import load_causal_lm
from rlctl.optim.scoring import response_logprobs, target_logprobs


def _batch(tokenizer, seed=0):
    """3 rows of 11 tokens, the first two left-padded (as rollouts are), the last 4 the response."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, tokenizer.vocab_size, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    attention_mask[1, :1] = 0
    input_ids[attention_mask == 0] = tokenizer.pad_token_id
    return input_ids, attention_mask


def _full_softmax_scores(model, input_ids, attention_mask, response_length, temperature):
    """The plain way, written out: every position's logits, an fp32 log-softmax over the whole
    vocabulary, the response tokens gathered; entropy −Σ p log p."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    log_probs = torch.log_softmax(logits[:, -response_length - 1 : -1].float() / temperature, dim=-1)
    logp = log_probs.gather(-1, input_ids[:, -response_length:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def _values_and_grads(model, fn):
    model.zero_grad()
    logp, entropy = fn()
    # Any fixed weighting of both outputs: its gradient touches every parameter, the head included.
    weights = torch.linspace(-1.0, 2.0, logp.numel()).reshape(logp.shape)
    ((logp * weights).sum() + 0.3 * (entropy * weights.flip(-1)).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), grads


@pytest.mark.parametrize("chunk_tokens", [1, 5, 0])  # a token at a time, chunks across rows, all at once
def test_chunked_logprobs_and_entropy_equal_the_full_log_softmax_gradients_included(tokenizer, chunk_tokens):
    model = load_causal_lm("random:tiny", tokenizer, seed=0)
    input_ids, attention_mask = _batch(tokenizer)
    expected = _values_and_grads(model, lambda: _full_softmax_scores(model, input_ids, attention_mask, 4, 0.7))
    chunked = _values_and_grads(model, lambda: response_logprobs(
        model, input_ids, attention_mask, 4, temperature=0.7, with_entropy=True, entropy_grad=True,
        chunk_tokens=chunk_tokens))  # fmt: skip
    torch.testing.assert_close(chunked[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked[1], expected[1], rtol=1e-5, atol=1e-5)  # entropy ≈ log V ≈ 11
    assert chunked[2].keys() == expected[2].keys() and len(expected[2]) == len(list(model.parameters()))
    for name, grad in expected[2].items():  # fp32 sums in another order: equal to ~1e-6 of the largest entry
        torch.testing.assert_close(chunked[2][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_entropy_carries_no_gradient_unless_asked(tokenizer, tiny_model):
    input_ids, attention_mask = _batch(tokenizer)
    logp, entropy = response_logprobs(tiny_model, input_ids, attention_mask, 4, with_entropy=True, chunk_tokens=3)
    assert logp.requires_grad and not entropy.requires_grad
    _, entropy = response_logprobs(tiny_model, input_ids, attention_mask, 4, with_entropy=True, entropy_grad=True)
    assert entropy.requires_grad


def test_a_model_that_rescales_its_logits_after_the_head_is_scored_from_its_own_logits(tokenizer):
    input_ids, attention_mask = _batch(tokenizer)
    with torch.no_grad():  # the same weights unchanged (a model is checked once: the first time it is scored)
        plain, _ = response_logprobs(load_causal_lm("random:tiny", tokenizer, seed=0), input_ids, attention_mask, 4)
    model = load_causal_lm("random:tiny", tokenizer, seed=0)

    def doubled(module, args, kwargs, output):  # as a logit_scale of 2 would do inside the forward
        output.logits = output.logits * 2
        return output

    model.register_forward_hook(doubled, with_kwargs=True)
    with torch.no_grad():
        logp, _ = response_logprobs(model, input_ids, attention_mask, 4, chunk_tokens=2)
        expected, _ = _full_softmax_scores(model, input_ids, attention_mask, 4, 1.0)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logp, plain, atol=1e-3)  # the doubling did change the scores


def test_target_logprobs_in_chunks_equal_the_full_log_softmax(tokenizer, tiny_model):
    # Right-padded rows; the loss covers positions 4.. of row 0 and 6.. of row 1 (targets 1 + k).
    input_ids, _ = _batch(tokenizer, seed=1)
    input_ids = input_ids[:2]
    attention = torch.ones_like(input_ids)
    positions = torch.arange(11).expand(2, 11)
    loss_mask = torch.zeros(2, 11)
    loss_mask[0, 4:] = 1
    loss_mask[1, 6:] = 1
    with torch.no_grad():
        logp, mask = target_logprobs(tiny_model, input_ids, attention, positions, loss_mask, chunk_tokens=3)
        full = torch.log_softmax(tiny_model(input_ids=input_ids).logits[:, :-1].float(), -1)
        expected = full.gather(-1, input_ids[:, 1:, None]).squeeze(-1)[:, 3:]  # first covered target: token 4
    assert torch.equal(mask, loss_mask[:, 4:])
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])  # LoRA: the embeddings are frozen, only adapters get gradients
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(tokenizer, lora):
    from rlctl.lora import LoraSpec, add_adapter
    from rlctl.models import checkpoint_activations

    input_ids, attention_mask = _batch(tokenizer)

    def grads(checkpointing: bool):
        model = load_causal_lm("random:tiny", tokenizer, seed=0)
        if lora:
            torch.manual_seed(0)  # the same random A in both models
            model = add_adapter(model, LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"]))
            with torch.no_grad():  # B ≠ 0, so A gets gradients too
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.fill_(0.01)
        if checkpointing:
            checkpoint_activations(model)
        model.train()  # transformers recomputes layers only in training mode
        return _values_and_grads(model, lambda: response_logprobs(
            model, input_ids, attention_mask, 4, with_entropy=True, entropy_grad=True))  # fmt: skip

    plain, checkpointed = grads(False), grads(True)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=1e-6)
    assert checkpointed[2].keys() == plain[2].keys() and plain[2]
    assert not lora or all("lora_" in name for name in plain[2])
    for name, grad in plain[2].items():
        torch.testing.assert_close(checkpointed[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_scoring_in_token_budget_micro_batches_equals_one_pass_over_the_batch(tokenizer, tiny_model):
    from contextlib import nullcontext

    from rlctl.batch import Batch
    from rlctl.optim.scoring import score_in_chunks

    # Prompts of 4, 6 and 7 real tokens, left-padded to 7, and responses of 4, 1 and 3 of T = 4
    # tokens; what follows a response is padding, never attended to.
    input_ids, attention_mask = _batch(tokenizer)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    attention_mask[:, -4:] = response_mask.long()
    input_ids[:, -4:][response_mask == 0] = tokenizer.pad_token_id
    batch = Batch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                  group_ids=torch.zeros(3, dtype=torch.long), prompts=[""] * 3, completions=[""] * 3, answers=[""] * 3)  # fmt: skip

    def logp(model, ids, mask, length):
        return response_logprobs(model, ids, mask, length)[0]

    with torch.no_grad():
        whole = logp(tiny_model, input_ids, attention_mask, 4)
    for chunk, budget in ((3, 0), (1, 0), (3, 14)):  # all at once; a row each; ≤ 14 padded tokens, by length
        parts = score_in_chunks(logp, tiny_model, batch, chunk, nullcontext, budget)
        assert parts.shape == whole.shape
        torch.testing.assert_close(parts * response_mask, whole * response_mask, rtol=0, atol=1e-5)


def _groups(tokenizer):
    """Two prompts (5 and 3 real tokens, left-padded to 5) × 3 completions of T = 4 with 4, 2, 1 /
    3, 4, 2 real tokens, right-padded: a rollout's layout, groups in row order."""
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, tokenizer.vocab_size, (2, 5), generator=generator)
    prompts[1, :2] = tokenizer.pad_token_id
    input_ids = torch.cat(
        [prompts.repeat_interleave(3, 0), torch.randint(3, tokenizer.vocab_size, (6, 4), generator=generator)], 1
    )
    lengths = torch.tensor([4, 2, 1, 3, 4, 2])
    response_mask = (torch.arange(4)[None, :] < lengths[:, None]).float()
    attention_mask = torch.cat([torch.ones(6, 5, dtype=torch.long), response_mask.long()], 1)
    attention_mask[3:, :2] = 0
    input_ids[attention_mask == 0] = tokenizer.pad_token_id
    return input_ids, attention_mask, response_mask


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean mask; an additive one
@pytest.mark.parametrize("max_width", [0, 8])  # one pack per prompt; packs of ≤ 8 tokens
def test_completions_scored_after_one_shared_prompt_equal_their_rows_scored_alone_gradients_included(
    tokenizer, attention, max_width, monkeypatch
):
    from rlctl.optim import scoring

    model = load_causal_lm("random:tiny", tokenizer, seed=0)
    model.config._attn_implementation = attention
    input_ids, attention_mask, response_mask = _groups(tokenizer)
    if max_width:  # the widest row is 5 + 4 = 9 tokens
        monkeypatch.setattr(scoring, "MAX_PACK_WIDTH_FACTOR", max_width / 9)
    packs = scoring.prompt_packs(input_ids, attention_mask, 4, max_width or 100)
    # ≤ 8 tokens: prompt 0 (5 tokens) + 4 → [0] alone (a pack holds ≥ 1 row), 5 + 2 + 1 → [1, 2];
    # prompt 1 (3 tokens): 3 + 3 (+ 4 > 8) → [3], 3 + 4 (+ 2 > 8) → [4], [5]. With room: a pack a prompt.
    assert packs == ([[0], [1, 2], [3], [4], [5]] if max_width else [[0, 1, 2], [3, 4, 5]])

    def scores(share):
        def fn():
            logp, entropy = response_logprobs(model, input_ids, attention_mask, 4, temperature=0.7, with_entropy=True,
                                              entropy_grad=True, share_prompts=share)  # fmt: skip
            return logp * response_mask, entropy * response_mask

        return _values_and_grads(model, fn)

    alone, shared = scores(False), scores(True)
    torch.testing.assert_close(shared[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[1], alone[1], rtol=1e-5, atol=1e-5)
    for name, grad in alone[2].items():
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_sharing_prompts_scores_zero_past_each_response_and_runs_fewer_tokens(tokenizer):
    model = load_causal_lm("random:tiny", tokenizer, seed=0)
    input_ids, attention_mask, response_mask = _groups(tokenizer)
    widths = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    with torch.no_grad():
        logp, _ = response_logprobs(model, input_ids, attention_mask, 4, share_prompts=True)
    # Two rows: 5 + 4 + 2 + 1 = 12 and 3 + 3 + 4 + 2 = 12 tokens, against 6 rows × 9 columns.
    assert widths == [torch.Size([2, 12])]
    assert torch.equal(logp == 0, response_mask == 0)


def test_critic_values_after_a_shared_prompt_equal_their_rows_valued_alone_gradients_included(tokenizer):
    from rlctl.models import load_value_model
    from rlctl.optim.scoring import response_values

    critic = load_value_model("random:tiny", tokenizer, seed=0)
    with torch.no_grad():  # a head that reads the states (it starts at zero)
        critic.head.weight.copy_(torch.linspace(-1, 1, critic.head.weight.numel()).reshape(critic.head.weight.shape))
    input_ids, attention_mask, response_mask = _groups(tokenizer)

    def values_and_grads(share):
        critic.zero_grad()
        values = response_values(critic, input_ids, attention_mask, 4, share_prompts=share) * response_mask
        (values * torch.linspace(-1, 2, values.numel()).reshape(values.shape)).sum().backward()
        return values.detach(), {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None}

    (alone, alone_grads), (shared, shared_grads) = values_and_grads(False), values_and_grads(True)
    torch.testing.assert_close(shared, alone, rtol=0, atol=1e-5)
    assert shared_grads.keys() == alone_grads.keys()
    for name, grad in alone_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_a_lora_policys_reference_scores_shared_prompts_from_its_own_logits_like_rows_alone(tokenizer):
    from rlctl.lora import AdapterDisabled, LoraSpec, add_adapter

    base = load_causal_lm("random:tiny", tokenizer, seed=0)
    input_ids, attention_mask, response_mask = _groups(tokenizer)
    with torch.no_grad():
        expected, _ = response_logprobs(base, input_ids, attention_mask, 4)
    policy = add_adapter(load_causal_lm("random:tiny", tokenizer, seed=0),
                         LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"]))  # fmt: skip
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)  # the adapted policy differs from the base
        reference = AdapterDisabled(policy)
        shared, _ = response_logprobs(reference, input_ids, attention_mask, 4, share_prompts=True)
        adapted, _ = response_logprobs(policy, input_ids, attention_mask, 4, share_prompts=True)
    torch.testing.assert_close(shared * response_mask, expected * response_mask, rtol=0, atol=1e-5)
    assert not torch.allclose(adapted * response_mask, expected * response_mask, atol=1e-3)
