"""The learned and remote reward terms: a reward model scores chat + completion with its own
tokenizer, normalised by running moments; a reward server is POSTed one batch and fails soft."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlctl.errors import RlctlError
from rlctl.rewards.http import HttpReward, HttpRewardSpec
from rlctl.rewards.model import ModelReward, ModelRewardSpec, RunningMoments, encode_texts, load_reward_model
from rlctl.rewards.rules import RewardFailure, Term, WeightedRewards

CHAT = [{"role": "user", "content": "What is 3 + 4? Answer with just the number."}]


@pytest.fixture(scope="module")
def tiny_rm_folder(tmp_path_factory, tokenizer):
    from rlctl.rm import load_rm_model

    folder = tmp_path_factory.mktemp("rm") / "tiny-rm"
    model = load_rm_model("random:tiny", tokenizer, "float32", False, seed=3)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def spec(path, **changes):
    values = {
        "model_path": path if isinstance(path, list) else str(path),
        "model_batch_size": 3,
        "model_max_tokens": 1024,
        "normalize": False,
        "clip": 0.0,
    }
    return ModelRewardSpec(**{**values, **changes})


def test_running_moments_merged_by_batch_equal_those_of_all_scores():
    # [1, 2, 3] then [4, 5]: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2.
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert (moments.count, moments.mean) == (5, pytest.approx(3.0))
    assert moments.std == pytest.approx(math.sqrt(2.0))
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.std == moments.std


def test_the_reward_model_scores_the_chat_template_text_with_its_own_tokenizer(tiny_rm_folder, tokenizer):
    reward = ModelReward(spec(tiny_rm_folder), "float32", False)
    completions = ["7", "The answer is 8.", "seven, I think, or maybe eight"]
    scores = reward([CHAT] * 3, completions, ["7"] * 3)
    # The same texts by hand: the template with the completion as the assistant's turn, one at a
    # time (no padding), read by the model's head at the last token.
    model, rm_tokenizer = load_reward_model(str(tiny_rm_folder))
    for completion, score in zip(completions, scores):
        text = rm_tokenizer.apply_chat_template([*CHAT, {"role": "assistant", "content": completion}], tokenize=False)
        ids = rm_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert text.endswith(f"{completion}<|im_end|>\n")
        with torch.no_grad():
            assert score == pytest.approx(float(model(input_ids=ids).logits[0, 0]), abs=1e-5)


def test_long_texts_keep_their_last_tokens(tokenizer):
    ids = encode_texts(tokenizer, [CHAT], ["the answer is 7"], max_tokens=8)[0]
    full = encode_texts(tokenizer, [CHAT], ["the answer is 7"], max_tokens=10_000)[0]
    assert ids == full[-8:]


def test_normalised_scores_use_the_moments_of_training_batches_only(tiny_rm_folder):
    reward = ModelReward(spec(tiny_rm_folder, normalize=True), "float32", False)
    completions = ["1", "2", "3", "4", "5", "66"]
    raw = reward.raw_scores([CHAT] * 6, completions)
    normalised = torch.tensor(reward([CHAT] * 6, completions, ["7"] * 6))
    # The first batch is normalised by its own moments: mean 0 and (population) std 1.
    assert float(normalised.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(normalised.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert reward.moments.count == 6 and reward.moments.mean == pytest.approx(float(raw.mean()), abs=1e-6)
    rewards = WeightedRewards([Term("reward_model", 1.0, {})], scorers={"reward_model": reward})
    with rewards.evaluating():
        rewards(completions, ["7"] * 6, [CHAT] * 6)
    assert reward.moments.count == 6  # evaluation left the moments alone
    rewards([completions[0]], ["7"], [CHAT])
    assert reward.moments.count == 7
    assert rewards.state_dict()["reward_model"]["moments"]["count"] == 7


def test_clipping_bounds_the_scores(tiny_rm_folder):
    reward = ModelReward(spec(tiny_rm_folder, normalize=True, clip=0.5), "float32", False)
    scores = reward([CHAT] * 6, ["1", "2", "3", "4", "5", "66"], ["7"] * 6)
    assert max(abs(s) for s in scores) <= 0.5 and any(abs(s) == 0.5 for s in scores)


def test_a_causal_lm_or_a_classifier_with_two_labels_is_refused(tmp_path, tiny_model, tokenizer):
    tiny_model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    with pytest.raises(
        RlctlError, match=r"reward.model_path: '.*lm' is not a reward model \(LlamaForCausalLM; .*score"
    ):
        load_reward_model(str(tmp_path / "lm"))
    from transformers import AutoModelForSequenceClassification

    from rlctl.models import random_config

    config = random_config("tiny", len(tokenizer), None, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config.num_labels = 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "two")
    tokenizer.save_pretrained(tmp_path / "two")
    with pytest.raises(RlctlError, match="is a classifier with 2 labels; a reward model has one"):
        load_reward_model(str(tmp_path / "two"))


def test_a_rule_at_weight_zero_reports_accuracy_beside_the_learned_reward(tiny_rm_folder):
    reward = ModelReward(spec(tiny_rm_folder), "float32", False)
    terms = [Term("reward_model", 1.0, {}), Term("exact_number", 0.0, {})]
    result = WeightedRewards(terms, accuracy_term=1, scorers={"reward_model": reward})(
        ["7", "8"], ["7", "7"], [CHAT] * 2
    )
    assert result.correct.tolist() == [True, False]
    assert result.scores.tolist() == pytest.approx(result.per_term["reward_model"].tolist())  # the rule adds 0


# --- the reward server ------------------------------------------------------------------------


class RewardServer:
    """A reward server on 127.0.0.1: ``reply(body) -> (status, json)``; records requests."""

    def __init__(self, reply):
        self.requests, self.reply = [], reply
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body))
                status, payload = server.reply(body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except BrokenPipeError:  # the client gave up waiting (the timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def length_scores(body):
    return 200, {"scores": [float(len(c)) for c in body["completions"]]}


def http_rewards(url, on_error="fallback", **changes):
    values = {"url": url, "headers": {}, "retries": 2, "timeout_s": 2.0, **changes}
    terms = [Term("http", 1.0, {}), Term("exact_number", 0.0, {})]
    return WeightedRewards(terms, 1, 2.0, -1.0, on_error, scorers={"http": HttpReward(HttpRewardSpec(**values))})


def test_the_server_gets_one_batch_with_prompts_and_its_scores_are_used(monkeypatch):
    server = RewardServer(length_scores)
    monkeypatch.setenv("RM_TEST_KEY", "secret-1")
    try:
        rewards = http_rewards(server.url, headers={"Authorization": "RM_TEST_KEY"})
        result = rewards(["7", "eight"], ["7", "7"], [CHAT, CHAT])
    finally:
        server.close()
    assert result.scores.tolist() == [1.0, 5.0] and result.correct.tolist() == [True, False]
    (headers, body), = server.requests  # fmt: skip
    assert body == {"prompts": [CHAT, CHAT], "completions": ["7", "eight"], "answers": ["7", "7"]}
    assert headers["Authorization"] == "secret-1"
    assert rewards.errors == 0


def test_step_rewards_from_the_server_are_credited_at_their_offsets():
    server = RewardServer(lambda body: (200, {"scores": [[[1, 0.5], [3, 0.25]] for _ in body["completions"]]}))
    try:
        result = http_rewards(server.url)(["a\nb\n"], ["7"], [CHAT])
    finally:
        server.close()
    assert result.scores.tolist() == [0.75]
    assert result.steps == [[(1, 0.5), (3, 0.25), (4, 0.0)]]  # the weight-0 rule credits 0 at the end


def test_a_server_that_is_down_gives_the_batch_the_fallback_and_counts_it():
    server = RewardServer(length_scores)
    url = server.url
    server.close()  # nothing listens there now
    rewards = http_rewards(url, retries=1)
    result = rewards(["7", "8", "9"], ["7"] * 3, [CHAT] * 3)
    assert result.scores.tolist() == [-1.0] * 3 and rewards.errors == 3
    count, first = result.failures["http"]
    assert count == 3 and url in first and "after 2 of 2 tries" in first


def test_a_server_that_fails_twice_then_answers_is_retried():
    calls = []

    def flaky(body):
        calls.append(1)
        return (503, {"error": "busy"}) if len(calls) <= 2 else length_scores(body)

    server = RewardServer(flaky)
    try:
        rewards = http_rewards(server.url, retries=2)
        result = rewards(["abc"], ["7"], [CHAT])
    finally:
        server.close()
    assert len(calls) == 3 and result.scores.tolist() == [3.0] and rewards.errors == 0


def test_a_wrong_number_of_scores_is_not_retried_and_falls_back():
    server = RewardServer(lambda body: (200, {"scores": [1.0]}))
    try:
        rewards = http_rewards(server.url)
        result = rewards(["7", "8"], ["7", "7"], [CHAT] * 2)
    finally:
        server.close()
    assert len(server.requests) == 1 and result.scores.tolist() == [-1.0, -1.0] and rewards.errors == 2
    assert "replied with 1 scores for 2 completions" in result.failures["http"][1]


def test_a_slow_server_runs_into_the_timeout():
    import time

    def slow(body):
        time.sleep(1.5)
        return length_scores(body)

    server = RewardServer(slow)
    try:
        rewards = http_rewards(server.url, retries=0, timeout_s=0.3)
        result = rewards(["7"], ["7"], [CHAT])
    finally:
        server.close()
    assert result.scores.tolist() == [-1.0] and "timed out" in result.failures["http"][1]


def test_on_error_stop_ends_the_run_with_one_line_naming_the_url():
    server = RewardServer(lambda body: (200, {"scores": "nope"}))
    try:
        with pytest.raises(
            RewardFailure, match=rf"reward 'http' failed .*{server.url} replied without a list 'scores'"
        ):
            http_rewards(server.url, on_error="stop")(["7"], ["7"], [CHAT])
    finally:
        server.close()


def test_header_values_come_from_the_environment_and_a_missing_one_is_named(monkeypatch):
    monkeypatch.delenv("RM_MISSING_KEY", raising=False)
    with pytest.raises(RlctlError, match="reward.headers.Authorization: the environment variable RM_MISSING_KEY"):
        HttpReward(HttpRewardSpec("http://127.0.0.1:1/", {"Authorization": "RM_MISSING_KEY"}))
    with pytest.raises(RlctlError, match="reward.url: must start with http:// or https://"):
        HttpReward(HttpRewardSpec("127.0.0.1:8000"))


# --- reward-model ensembles ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_rm_folder(tmp_path_factory, tokenizer):
    from rlctl.rm import load_rm_model

    folder = tmp_path_factory.mktemp("rm") / "tiny-rm-b"
    model = load_rm_model("random:tiny", tokenizer, "float32", False, seed=5)  # another head and body
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_ensemble_scores_the_members_mean_minus_k_times_their_std(tiny_rm_folder, second_rm_folder):
    completions = ["7", "The answer is 8.", "seven"]
    a = ModelReward(spec(tiny_rm_folder), "float32", False)([CHAT] * 3, completions, ["7"] * 3)
    b = ModelReward(spec(second_rm_folder), "float32", False)([CHAT] * 3, completions, ["7"] * 3)
    assert a != pytest.approx(b)  # two different members
    ensemble = ModelReward(spec([str(tiny_rm_folder), str(second_rm_folder)], ensemble_penalty=0.5), "float32", False)
    scores = ensemble([CHAT] * 3, completions, ["7"] * 3)
    # By hand: two members' mean (a + b)/2 and population std |a − b|/2.
    for s, x, y in zip(scores, a, b):
        assert s == pytest.approx((x + y) / 2 - 0.5 * abs(x - y) / 2, abs=1e-5)
    std = ensemble.last_stats["ensemble_std"]
    assert std.tolist() == pytest.approx([abs(x - y) / 2 for x, y in zip(a, b)], abs=1e-5)
    plain_mean = ModelReward(spec([str(tiny_rm_folder), str(second_rm_folder)]), "float32", False)
    assert plain_mean([CHAT] * 3, completions, ["7"] * 3) == pytest.approx(
        [(x + y) / 2 for x, y in zip(a, b)], abs=1e-5
    )


def test_the_ensembles_disagreement_is_logged_beside_the_terms(tiny_rm_folder, second_rm_folder):
    members = ModelReward(spec([str(tiny_rm_folder), str(second_rm_folder)], ensemble_penalty=1.0), "float32", False)
    rewards = WeightedRewards([Term("exact_number", 1.0, {}), Term("reward_model", 0.1, {})],
                              scorers={"reward_model": members})  # fmt: skip
    result = rewards(["7", "8"], ["7", "7"], [CHAT, CHAT])
    assert list(result.per_term) == ["exact_number", "reward_model", "ensemble_std"]  # after the terms
    assert result.correct.tolist() == [True, False]  # the accuracy term is still the first
    assert (result.per_term["ensemble_std"] > 0).all()


def test_ensemble_mistakes_name_the_key(tiny_rm_folder, tiny_model, tokenizer, tmp_path):
    from test_architectures import compose_for

    from rlctl.build import reward_settings

    members = f"reward.model_path=[{tiny_rm_folder},{tiny_rm_folder}]"
    with pytest.raises(RlctlError, match=r"^reward.ensemble_penalty: must be ≥ 0 \(0 = the members' mean\), got -1"):
        reward_settings(compose_for("train", "tiny", "reward=model", members, "reward.ensemble_penalty=-1").reward)
    with pytest.raises(RlctlError, match=r"^reward.model_path: must name at least one reward model"):
        reward_settings(compose_for("train", "tiny", "reward=model", "reward.model_path=[]").reward)
    assert (
        reward_settings(compose_for("train", "tiny", "reward=model", members).reward)[1].paths
        == [str(tiny_rm_folder)] * 2
    )
    tiny_model.save_pretrained(tmp_path / "causal")  # a member that is not a reward model
    tokenizer.save_pretrained(tmp_path / "causal")
    with pytest.raises(RlctlError, match=r"^reward.model_path\[1\]: .* is not a reward model"):
        ModelReward(spec([str(tiny_rm_folder), str(tmp_path / "causal")]), "float32", False)


# --- the judge: a causal LM's P(Yes) --------------------------------------------------------------


def judge_spec(**changes):
    from rlctl.config import JudgeConfig
    from rlctl.rewards.judge import JudgeSpec

    return JudgeSpec(**{"model_path": None, "form": JudgeConfig().form, "template": JudgeConfig().template,
                        "batch_size": 2, "max_tokens": 1024,
                        **changes})  # fmt: skip


def test_the_judge_scores_p_yes_over_p_yes_plus_p_no_of_its_next_token(tiny_model, tokenizer):
    from rlctl.rewards.judge import JudgeReward

    judge = JudgeReward(judge_spec(), "random:tiny", "float32", False)
    completions = ["7", "The answer is 8, I am quite sure of it."]  # two lengths: one batch, left-padded
    scores = judge([CHAT, CHAT], completions, ["7", "7"])
    yes, no = (
        tokenizer("Yes", add_special_tokens=False)["input_ids"],
        tokenizer("No", add_special_tokens=False)["input_ids"],
    )
    assert len(yes) == len(no) == 1 and (judge.yes, judge.no) == (yes[0], no[0])
    for completion, score in zip(completions, scores):
        # By hand, one sample at a time: the filled template as a user turn, the assistant's turn opened,
        # the full softmax at the next position, then P(Yes) / (P(Yes) + P(No)).
        question = (f"Question: {CHAT[0]['content']}\nReply: {completion}\nReference answer: 7\n"
                    "Does the reply answer the question correctly? Answer Yes or No.")  # fmt: skip
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            p = torch.softmax(tiny_model(input_ids=ids).logits[0, -1].double(), dim=-1)
        assert score == pytest.approx(float(p[yes[0]] / (p[yes[0]] + p[no[0]])), abs=1e-5)
    assert all(0 < s < 1 for s in scores)


def test_a_judge_whose_tokenizer_splits_the_verdict_is_refused_in_one_line(tokenizer):
    from rlctl.rewards.judge import verdict_token

    assert verdict_token(tokenizer, "Yes") == tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(
        RlctlError,
        match=r"^reward.judge.model_path: the judge's tokenizer writes 'Yesssirreee' after its prompt as \d+ tokens",
    ):
        verdict_token(tokenizer, "Yesssirreee")


def test_judge_mistakes_name_the_key():
    from test_architectures import compose_for

    from rlctl.build import reward_settings

    with pytest.raises(RlctlError, match=r"^reward.judge.form: must be one of \['question', 'conversation'\]"):
        reward_settings(compose_for("train", "tiny", "reward=judge", "reward.judge.form=chat").reward)
    with pytest.raises(RlctlError, match=r"^reward.judge.template: must contain \{completion\}"):
        reward_settings(compose_for("train", "tiny", "reward=judge", "reward.judge.template=Is it right?").reward)
    with pytest.raises(RlctlError, match=r"^reward.judge.batch_size: must be ≥ 1, got 0"):
        reward_settings(compose_for("train", "tiny", "reward=judge", "reward.judge.batch_size=0").reward)
