"""Data sources, prompt encoding and the sampler."""

import json

import pytest

from rlctl.data import PromptSampler, encode_prompts, load_examples
from rlctl.data.prompts import PromptFormat
from rlctl.data.sources import Example, SourceSpec, gsm8k_final_answer
from rlctl.errors import RlctlError

SHARED_GSM8K = "../shared/data/gsm8k/test.jsonl"


def test_arithmetic_split_is_disjoint_seeded_and_correct():
    train, held = load_examples("arithmetic", SourceSpec(digits=1, eval_fraction=0.25, eval_size=1000))
    assert len(train) + len(held) == 100  # every single-digit pair a + b exactly once
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    again, _ = load_examples("arithmetic", SourceSpec(digits=1, eval_fraction=0.25, eval_size=1000))
    assert [e.prompt for e in again] == [e.prompt for e in train]
    for example in train[:20]:
        a, b = example.prompt.removeprefix("What is ").split("?")[0].split(" + ")
        assert int(example.answer) == int(a) + int(b)


def test_arithmetic_difficulty_knobs():
    train, _ = load_examples("arithmetic", SourceSpec(digits=2, num_operands=3, operators="*-", eval_size=10))
    expression = train[0].prompt.removeprefix("What is ").split("?")[0]
    assert len(expression.split()) == 5 and all(len(t) == 2 for t in expression.split()[::2])
    assert int(train[0].answer) == eval(expression)
    with pytest.raises(RlctlError, match="operators"):
        load_examples("arithmetic", SourceSpec(operators="/"))


def test_jsonl_missing_field_names_the_row(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text(json.dumps({"q": "a?", "answer": "1"}) + "\n" + json.dumps({"answer": "2"}) + "\n")
    with pytest.raises(RlctlError, match=r"d\.jsonl:2 has no field 'q'"):
        load_examples("jsonl", SourceSpec(path=str(file), prompt_field="q"))


def test_jsonl_errors_name_the_file_and_row(tmp_path):
    with pytest.raises(RlctlError, match="file not found: .*nope.jsonl"):
        load_examples("jsonl", SourceSpec(path=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(RlctlError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_examples("jsonl", SourceSpec(path=str(bad), prompt_field="prompt"))


def test_jsonl_accepts_chat_messages_and_a_separate_eval_file(tmp_path):
    train = tmp_path / "train.jsonl"
    chat = [{"role": "user", "content": "Say 1"}]
    train.write_text("\n".join(json.dumps({"messages": chat, "label": i}) for i in range(3)) + "\n")
    examples, held = load_examples(
        "jsonl", SourceSpec(path=str(train), eval_path=str(train), prompt_field="messages", answer_field="label")
    )
    assert examples[0].prompt == chat and examples[2].answer == "2" and len(held) == 3


def test_gsm8k_local_file_reads_the_final_answer():
    train, held = load_examples("gsm8k", SourceSpec(path=SHARED_GSM8K, answer_format="gsm8k", eval_size=5))
    assert len(train) + len(held) > 1000 and len(held) == 5
    assert gsm8k_final_answer("so 1,000 + 2 = 1002\n#### 1,002") == "1002"
    assert all(e.answer.lstrip("-").replace(".", "").isdigit() for e in train[:50])


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(RlctlError, match=r"known: \['arithmetic', 'calculator', 'gsm8k', 'hf', 'jsonl'\]"):
        load_examples("csv", SourceSpec())


def test_chat_template_is_applied_once_without_a_doubled_bos(tokenizer):
    prompts = encode_prompts([Example("What is 1 + 1?", "2", "t")], PromptFormat(), tokenizer)
    ids = prompts.token_ids[0]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant turns
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_overlong_prompts_are_skipped_or_truncated_and_counted(tokenizer):
    examples = [Example("short", "1", "a"), Example("word " * 200, "2", "b")]
    skipped = encode_prompts(examples, PromptFormat(max_prompt_tokens=64, overlong="skip"), tokenizer)
    assert len(skipped) == 1 and skipped.skipped == 1 and skipped.truncated == 0
    cut = encode_prompts(examples, PromptFormat(max_prompt_tokens=64, overlong="truncate"), tokenizer)
    assert len(cut) == 2 and cut.truncated == 1 and len(cut.token_ids[1]) == 64


def test_sampler_visits_every_prompt_once_per_epoch_and_resumes():
    sampler = PromptSampler(10, 4, seed=3)
    first_epoch = sampler.next_batch() + sampler.next_batch() + sampler.next_batch()[:2]
    assert sorted(first_epoch) == list(range(10))
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    resumed = PromptSampler(10, 4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(3)] == expected
