"""The ``judge`` term: a causal language model asked whether a reply is right, scored from its
next-token distribution, without generating.

The question is ``reward.judge.template`` with ``{prompt}`` (the last user message), ``{completion}``
and ``{answer}`` filled in, rendered through the judge's chat template with the assistant's turn
opened: as one user turn that quotes the reply (``form=question``), or as the next user turn after
the policy's own chat and reply (``form=conversation``). With z_Yes and z_No the judge's logits of the "Yes" and "No" tokens at the
next position, the score is

    P(Yes) / (P(Yes) + P(No)) = σ(z_Yes − z_No)        (the other tokens' mass cancels)

in [0, 1]: one forward pass per sample, in batches, frozen (partitioned under ZeRO-3 like the
reference), its LM head in float32 (``verdict_logits``). The judge keeps what its language model knows about the task, which a scalar head
trained on a few pairs can lose; by default it is the policy's own starting model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from rlctl import models
from rlctl.errors import RlctlError, check_fields
from rlctl.rollout.hf import left_pad

FORMS = ("question", "conversation")
# The question a judge is asked, by form, when neither reward.judge.template nor its training names one:
# "question" quotes the reply in one user turn; "conversation" continues the policy's own chat, the
# reply as the assistant's turn, with this as the next user turn.
DEFAULT_TEMPLATES = {
    "question": "Question: {prompt}\nReply: {completion}\nReference answer: {answer}\n"
    "Does the reply answer the question correctly? Answer Yes or No.",
    "conversation": "Is your answer correct? Answer Yes or No.",
}
# What `rlctl rm head=judge` asks by default: preference pairs hold no reference answer.
PAIR_TEMPLATES = {
    "question": "Question: {prompt}\nReply: {completion}\nDoes the reply answer the question correctly? Answer Yes or No.",
    "conversation": DEFAULT_TEMPLATES["conversation"],
}
# Written beside a judge trained by `rlctl rm head=judge`: the form and template it learned to answer.
TRAINED_JUDGE_FILE = "rlctl_judge.json"


@dataclass(frozen=True)
class JudgeSpec:
    """The ``reward.judge`` group (filled by field name)."""

    model_path: str | None  # the judge; None: the policy's model.path
    form: str | None  # question | conversation; None: the trained judge's own, else question
    template: str | None  # the question, with {prompt}, {completion} and {answer}; None: the judge's own
    batch_size: int  # samples per forward pass
    max_tokens: int  # a longer question keeps its last tokens

    def __post_init__(self) -> None:
        checks = (("form", self.form in (None, *FORMS), f"must be one of {list(FORMS)}"),
                  ("template", self.template is None or "{completion}" in self.template or self.form == "conversation",
                   "must contain {completion} (the form question quotes the reply in it)"),
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


def verdict_token(tokenizer, word: str, key: str = "reward.judge.model_path") -> int:
    """The one token the judge's reply starts with when it says ``word`` right after the prompt;
    one line naming the judge when ``word`` takes several tokens there."""
    context = judge_prompt_ids(tokenizer, "Is this a question? Answer Yes or No.")
    with_word = tokenizer.decode(context) + (word if getattr(tokenizer, "chat_template", None) else f" {word}")
    full = tokenizer(with_word, add_special_tokens=False)["input_ids"]
    extra = full[len(context) :]
    if len(extra) != 1 or full[: len(context)] != context:
        raise RlctlError(
            f"{key}: the judge's tokenizer writes {word!r} after its prompt as {len(extra)} tokens "
            f"({extra}); the judge reads one token's probability, so pick a judge whose tokenizer has it as one"
        )
    return extra[0]


def trained_judge(folder: str) -> dict:
    """{"form", "template"} a judge trained by `rlctl rm head=judge` learned to answer ({} for any other model)."""
    import json
    from pathlib import Path

    file = Path(folder) / TRAINED_JUDGE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def judge_ids(tokenizer, form: str, template: str, chat: list[dict], completion: str, answer: str = "") -> list[int]:
    """The token ids a judge reads before its verdict: ``question``, the filled template as one user
    turn; ``conversation``, the policy's chat, the reply as the assistant's turn, then the filled
    template as the next user turn; either with the assistant's turn opened."""
    question = fill_template(template, chat, completion, answer)
    if form == "question":
        return judge_prompt_ids(tokenizer, question)
    if not getattr(tokenizer, "chat_template", None):
        raise RlctlError("reward.judge.form: conversation needs a judge with a chat template; use form=question")
    messages = [*chat, {"role": "assistant", "content": completion}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fill_template(template: str, chat: list[dict], completion: str, answer: str = "") -> str:
    """The question about one reply; {prompt} is the chat's last user message."""
    prompt = next((m["content"] for m in reversed(chat) if m.get("role") == "user"), "")
    return template.replace("{prompt}", prompt).replace("{completion}", completion).replace("{answer}", str(answer))


def verdict_logits(model, rows: list[list[int]], pad_id: int, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The judge's logits at the position after each question [B, V] (float32): one forward pass
    (under ``autocast``), rows left-padded so that every row's next position is the last column. The
    LM head then runs on that one position in float32 outside autocast: the verdict is a small
    difference of two logits, which bf16 rounds to ties between replies (a quarter of the built-in
    held-out pairs for SmolLM2). Differentiable (``rlctl rm head=judge`` trains through it)."""
    ids, mask = left_pad(rows, pad_id)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    with autocast():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    use_cache=False, output_hidden_states=True, logits_to_keep=1)  # fmt: skip
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    head = module.get_output_embeddings()
    with torch.autocast(device.type, enabled=False):
        logits = head(out.hidden_states[-1][:, -1].to(head.weight.dtype)).float()
    cap = getattr(module.config, "final_logit_softcapping", None)  # Gemma 2's, applied after the head
    return torch.tanh(logits / cap) * cap if cap else logits


class JudgeReward:
    """The ``judge`` term (module docstring)."""

    time_limited = False  # a forward pass is not user code

    def __init__(self, spec: JudgeSpec, default_path: str, dtype: str, trust_remote_code: bool, zero=None,
                 autocast=None):  # fmt: skip
        from rlctl.optim.engine import frozen_for_inference

        path = spec.model_path or default_path
        # a trained judge is asked what it was taught (unless the config says otherwise); any other the default
        taught = trained_judge(models.resolve(path, "reward.judge.model_path"))
        form = spec.form or taught.get("form", "question")
        template = spec.template or (taught["template"] if taught.get("form", "question") == form and taught else None)
        spec = replace(spec, form=form, template=template or DEFAULT_TEMPLATES[form])
        self.spec = spec
        self.tokenizer = models.load_tokenizer(path, trust_remote_code)
        self.yes, self.no = verdict_token(self.tokenizer, "Yes"), verdict_token(self.tokenizer, "No")
        model = models.load_causal_lm(path, self.tokenizer, dtype, trust_remote_code)
        self.model = frozen_for_inference(model, zero)
        self.autocast = autocast or contextlib.nullcontext

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[float]:
        """σ(z_Yes − z_No) of each sample [N], z the judge's logits at the position after its prompt."""
        rows = [judge_ids(self.tokenizer, self.spec.form, self.spec.template, chat, completion, answer)[-self.spec.max_tokens :]
                for chat, completion, answer in zip(prompts, completions, answers)]  # fmt: skip
        scores = []
        for start in range(0, len(rows), self.spec.batch_size):
            logits = verdict_logits(self.model, rows[start : start + self.spec.batch_size], self.tokenizer.pad_token_id,
                                    self.autocast).cpu()  # fmt: skip
            scores.append(torch.sigmoid(logits[:, self.yes] - logits[:, self.no]))
        return torch.cat(scores).tolist() if scores else []
