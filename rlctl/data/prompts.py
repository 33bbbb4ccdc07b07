"""Turn examples into token ids the policy sees: template, chat template, length limit."""

from __future__ import annotations

from dataclasses import dataclass

from rlctl.data.sources import Example
from rlctl.errors import RlctlError

_MAX_CHARS_PER_TOKEN = 256  # more characters than any tokenizer packs into one token


@dataclass(frozen=True)
class PromptFormat:
    prompt_template: str = "{prompt}"  # applied to string prompts
    system_prompt: str | None = None
    chat_template: bool = True
    max_prompt_tokens: int = 512
    overlong: str = "skip"  # skip | truncate


@dataclass(frozen=True)
class PromptSet:
    examples: list[Example]  # the examples kept, aligned with token_ids
    token_ids: list[list[int]]  # prompt tokens, special tokens included exactly once
    conversations: list[list[dict]]  # the chat each prompt stands for (template and system prompt applied)
    skipped: int  # prompts dropped for being longer than the limit
    truncated: int  # prompts cut to the limit

    def __len__(self) -> int:
        return len(self.examples)


def conversation(example: Example, fmt: PromptFormat) -> list[dict]:
    """The prompt as chat messages: a string prompt through ``prompt_template`` as the user's
    message, the system prompt first. What a reward model or a reward server is shown."""
    return _messages(example, fmt)[1]


def _messages(example: Example, fmt: PromptFormat) -> tuple[str | None, list[dict]]:
    if isinstance(example.prompt, str):
        try:
            text = fmt.prompt_template.format(prompt=example.prompt)
        except (KeyError, IndexError) as err:
            raise RlctlError(
                f"data.prompt_template: {fmt.prompt_template!r} may only use {{prompt}} (got {err})"
            ) from None
        messages = [{"role": "user", "content": text}]
    else:
        text, messages = None, list(example.prompt)
    if fmt.system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": fmt.system_prompt}, *messages]
    return text, messages


def render(example: Example, fmt: PromptFormat, tokenizer) -> tuple[str, bool]:
    """The prompt as text, and whether it already holds the special tokens (from a chat template)."""
    text, messages = _messages(example, fmt)
    if text is not None and not uses_chat_template(fmt.chat_template, tokenizer):
        return (f"{fmt.system_prompt}\n\n{text}" if fmt.system_prompt else text), False
    return render_messages(messages, fmt.chat_template, tokenizer)


def uses_chat_template(chat_template: bool, tokenizer) -> bool:
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def render_messages(messages: list[dict], chat_template: bool, tokenizer) -> tuple[str, bool]:
    """Chat messages as the prompt of the assistant's next turn: through the tokenizer's chat template
    (special tokens included), or without one as "role: content" lines ending in "assistant:"."""
    if uses_chat_template(chat_template, tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:", False


def encode_prompts(examples: list[Example], fmt: PromptFormat, tokenizer) -> PromptSet:
    """Tokenise every prompt once. A chat template already writes BOS, so no second one is added."""
    if fmt.overlong not in ("skip", "truncate"):
        raise RlctlError(f"data.overlong: must be 'skip' or 'truncate', got {fmt.overlong!r}")
    kept, ids, chats, skipped, truncated = [], [], [], 0, 0
    for example in examples:
        text, has_special = render(example, fmt, tokenizer)
        if fmt.overlong == "skip" and len(text) > fmt.max_prompt_tokens * _MAX_CHARS_PER_TOKEN:
            skipped += 1  # certainly too long: don't spend seconds tokenising a huge field
            continue
        tokens = tokenizer(text, add_special_tokens=not has_special)["input_ids"]
        if len(tokens) > fmt.max_prompt_tokens:
            if fmt.overlong == "skip":
                skipped += 1
                continue
            tokens, truncated = tokens[-fmt.max_prompt_tokens :], truncated + 1
        kept.append(example)
        ids.append(tokens)
        chats.append(conversation(example, fmt))
    return PromptSet(kept, ids, chats, skipped, truncated)
