"""Rollout and scoring on the tiny random model."""

import torch

from rlctl.optim.engine import FrozenPolicy
from rlctl.optim.scoring import response_logprobs
from rlctl.rollout import HFRollout, SamplingParams
from rlctl.rollout.hf import left_pad, response_mask_until_eos


def test_left_pad_aligns_prompts_on_the_right():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_response_mask_keeps_tokens_up_to_and_including_the_first_eos():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert response_mask_until_eos(responses, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_generate_returns_groups_in_order_with_aligned_tensors(tokenizer, tiny_model):
    torch.manual_seed(0)
    rollout = HFRollout(tokenizer, SamplingParams(max_new_tokens=6, batch_size=3))  # 3 splits 2×4 rows unevenly
    prompts = [tokenizer("hello there")["input_ids"], tokenizer("a much longer prompt than the first")["input_ids"]]
    batch = rollout.generate(FrozenPolicy(tiny_model), prompts, ["1", "2"], group_size=4)
    assert batch.input_ids.shape[0] == 8 and batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.answers == ["1"] * 4 + ["2"] * 4
    assert batch.response_mask.shape == (8, batch.input_ids.shape[1] - max(len(p) for p in prompts))
    assert batch.response_length <= 6
    # attention covers exactly the real prompt tokens plus the valid response tokens
    assert batch.attention_mask.sum(1).tolist() == [
        len(prompts[g]) + int(n) for g, n in zip(batch.group_ids.tolist(), batch.response_mask.sum(1).tolist())
    ]


def test_greedy_generation_is_deterministic(tokenizer, tiny_model):
    rollout = HFRollout(tokenizer, SamplingParams(max_new_tokens=5, temperature=0.0))
    prompt = [tokenizer("What is 1 + 1?")["input_ids"]]
    assert (
        rollout.generate(FrozenPolicy(tiny_model), prompt, ["2"], 2).completions
        == rollout.generate(FrozenPolicy(tiny_model), prompt, ["2"], 2).completions
    )


def test_response_logprobs_match_a_full_forward_and_ignore_left_padding(tokenizer, tiny_model):
    torch.manual_seed(0)
    rollout = HFRollout(tokenizer, SamplingParams(max_new_tokens=4))
    prompts = [tokenizer("short")["input_ids"], tokenizer("a somewhat longer prompt")["input_ids"]]
    batch = rollout.generate(FrozenPolicy(tiny_model), prompts, ["", ""], group_size=1)
    with torch.no_grad():
        logp, entropy = response_logprobs(
            tiny_model, batch.input_ids, batch.attention_mask, batch.response_length, with_entropy=True
        )
        # Row 0 recomputed alone, without padding, through the plain full-logits path.
        real = batch.attention_mask[0].bool()
        ids = batch.input_ids[0][real][None]
        full = torch.log_softmax(tiny_model(input_ids=ids).logits[0, :-1].float(), -1)
        n_valid = int(batch.response_mask[0].sum())
        # The valid response tokens are the last n_valid real tokens; full[j − 1] predicts token j.
        expected = full[-n_valid:].gather(-1, ids[0, -n_valid:, None]).squeeze(-1)
    assert logp.shape == entropy.shape == batch.response_mask.shape
    assert (entropy[batch.response_mask.bool()] >= 0).all()
    assert torch.allclose(logp[0, :n_valid], expected, atol=1e-4)
