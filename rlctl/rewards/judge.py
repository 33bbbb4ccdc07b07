"""The ``judge`` term: a causal language model asked whether a reply is right, scored from its
next-token distribution, without generating.

The question is ``reward.judge.template`` with ``{prompt}`` (the last user message), ``{completion}``
and ``{answer}`` filled in, rendered as a user turn through the judge's chat template with the
assistant's turn opened. With z_Yes and z_No the judge's logits of the "Yes" and "No" tokens at the
next position, the score is

    P(Yes) / (P(Yes) + P(No)) = σ(z_Yes − z_No)        (the other tokens' mass cancels)

in [0, 1]: one forward pass per sample, in batches, frozen (partitioned under ZeRO-3 like the
reference). The judge keeps what its language model knows about the task, which a scalar head
trained on a few pairs can lose; by default it is the policy's own starting model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlctl import models
from rlctl.errors import RlctlError, check_fields
from rlctl.rollout.hf import left_pad


@dataclass(frozen=True)
class JudgeSpec:
    """The ``reward.judge`` group (filled by field name)."""

    model_path: str | None  # the judge; None: the policy's model.path
    template: str  # the question, with {prompt}, {completion} and {answer}
    batch_size: int  # samples per forward pass
    max_tokens: int  # a longer question keeps its last tokens

    def __post_init__(self) -> None:
        checks = (("template", "{completion}" in self.template, "must contain {completion}"),
                  ("batch_size", self.batch_size >= 1, "must be ≥ 1"),
                  ("max_tokens", self.max_tokens >= 8, "must be ≥ 8"))  # fmt: skip
        check_fields(self, checks)


def judge_prompt_ids(tokenizer, question: str) -> list[int]:
    """The question as a user turn with the assistant's turn opened (the judge's chat template), or
    the plain question followed by "Answer:" for a model without one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{question}\nAnswer:", add_special_tokens=True)["input_ids"]


def verdict_token(tokenizer, word: str, key: str = "reward.judge") -> int:
    """The one token the judge's reply starts with when it says ``word`` right after the prompt;
    one line naming the judge when ``word`` takes several tokens there."""
    context = judge_prompt_ids(tokenizer, "Is this a question? Answer Yes or No.")
    with_word = tokenizer.decode(context) + (word if getattr(tokenizer, "chat_template", None) else f" {word}")
    full = tokenizer(with_word, add_special_tokens=False)["input_ids"]
    extra = full[len(context) :]
    if len(extra) != 1 or full[: len(context)] != context:
        raise RlctlError(
            f"{key}.model_path: the judge's tokenizer writes {word!r} after its prompt as {len(extra)} tokens "
            f"({extra}); the judge reads one token's probability, so pick a judge whose tokenizer has it as one"
        )
    return extra[0]


class JudgeReward:
    """The ``judge`` term (module docstring)."""

    time_limited = False  # a forward pass is not user code

    def __init__(self, spec: JudgeSpec, default_path: str, dtype: str, trust_remote_code: bool, zero=None,
                 autocast=None):  # fmt: skip
        from rlctl.optim.engine import frozen_for_inference

        self.spec = spec
        path = spec.model_path or default_path
        self.tokenizer = models.load_tokenizer(path, trust_remote_code)
        self.yes, self.no = verdict_token(self.tokenizer, "Yes"), verdict_token(self.tokenizer, "No")
        model = models.load_causal_lm(path, self.tokenizer, dtype, trust_remote_code)
        self.model = frozen_for_inference(model, zero)
        self.autocast = autocast or contextlib.nullcontext

    def questions(self, prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[str]:
        def last_user(chat: list[dict]) -> str:
            return next((m["content"] for m in reversed(chat) if m.get("role") == "user"), "")

        return [self.spec.template.replace("{prompt}", last_user(chat)).replace("{completion}", completion)
                .replace("{answer}", str(answer)) for chat, completion, answer in zip(prompts, completions, answers)]  # fmt: skip

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[float]:
        """σ(z_Yes − z_No) of each sample [N], z the judge's logits at the position after its prompt."""
        rows = [judge_prompt_ids(self.tokenizer, q)[-self.spec.max_tokens :]
                for q in self.questions(prompts, completions, answers)]  # fmt: skip
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(rows), self.spec.batch_size):
            # left-padded: every row's next position is the last column
            ids, mask = left_pad(rows[start : start + self.spec.batch_size], self.tokenizer.pad_token_id)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            with self.autocast():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), use_cache=False).logits[:, -1].float().cpu()  # fmt: skip
            scores.append(torch.sigmoid(logits[:, self.yes] - logits[:, self.no]))
        return torch.cat(scores).tolist() if scores else []
