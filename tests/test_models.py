"""Model loading: run folders, critics from causal LMs and from reward models."""

import pytest
import torch
from transformers import LlamaForSequenceClassification

from rlctl.errors import RlctlError
from rlctl.models import load_causal_lm, load_value_model, random_config, resolve


def test_a_run_folder_stands_for_its_final_checkpoint(tmp_path, tokenizer, tiny_model):
    final = tmp_path / "checkpoints" / "final"
    tiny_model.save_pretrained(final)
    assert resolve(str(tmp_path)) == str(final)
    assert resolve("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"


def test_a_critic_can_start_from_a_reward_model(tmp_path, tokenizer):
    config = random_config(
        "tiny", len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    config.num_labels = 1
    reward_model = LlamaForSequenceClassification(config)
    reward_model.save_pretrained(tmp_path)
    critic = load_value_model(str(tmp_path), tokenizer)
    assert torch.equal(critic.backbone.embed_tokens.weight, reward_model.model.embed_tokens.weight)
    ids = torch.tensor([[1, 2, 3]])
    values = critic(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(3)[None])
    assert values.shape == (1, 3) and values.abs().sum() == 0  # the new head starts at zero


def test_a_saved_critic_reloads_with_its_head(tmp_path, tokenizer):
    critic = load_value_model("random:tiny", tokenizer)
    torch.nn.init.constant_(critic.head.bias, 0.25)
    critic.save_pretrained(tmp_path)
    again = load_value_model(str(tmp_path), tokenizer)
    assert again.head.bias.item() == pytest.approx(0.25)


def test_unknown_paths_name_the_key():
    with pytest.raises(RlctlError, match="^critic.path: no such folder: /no/such/model"):
        load_value_model("/no/such/model", None)
    with pytest.raises(RlctlError, match="^model.path: no such folder: /no/such/model"):
        resolve("/no/such/model")
    with pytest.raises(
        RlctlError, match=r"^model.path: unknown random model 'random:huge'; known: \['random:tiny', 'random:qwen2'"
    ):
        load_causal_lm("random:huge", None)
    with pytest.raises(RlctlError, match=r"unknown embedded model 'embedded:gpt5'; known: \['embedded:smollm2-135m'\]"):
        resolve("embedded:gpt5")


def test_a_critic_saves_a_given_state_dict_split_into_body_and_head(tmp_path, tokenizer):
    critic = load_value_model("random:tiny", tokenizer)
    state = {k: torch.full_like(v, 0.5) for k, v in critic.state_dict().items()}  # e.g. gathered under ZeRO-3
    critic.save_pretrained(tmp_path, state_dict=state)
    again = load_value_model(str(tmp_path), tokenizer)
    assert all(torch.all(v == 0.5) for v in again.state_dict().values())
