"""Demonstrations for supervised fine-tuning: conversations whose assistant turns are trained.

Sources: ``arithmetic`` (built in: worked answers to the arithmetic task, "23 + 48: 3 + 8 = 11,
write 1 carry 1; 2 + 4 + 1 = 7; so 71"), ``calculator`` (built in: the arithmetic task solved by
calling the calculator tool, for ``env=calculator``), and JSONL files (``jsonl``, or ``gsm8k`` from
``data.path``) whose rows hold chat ``messages``, or a ``prompt`` and a ``completion``. A row may
also hold a reference answer (``data.answer_field``): held-out rows with one are scored by the
reward rules, as in ``rlctl train``.

:func:`encode_demonstration` renders a conversation with the tokenizer's chat template and marks
the tokens the loss covers: each assistant turn's text and the token that ends the turn, nothing
of the system or user turns, the template's role headers or what follows the end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlctl.data.prompts import PromptFormat, conversation
from rlctl.data.sources import Example, SourceSpec, arithmetic, gsm8k_final_answer, read_rows, split_held_out
from rlctl.errors import RlctlError

Messages = list[dict]


@dataclass(frozen=True)
class Demonstration:
    messages: Messages  # the whole conversation; its assistant turns from message `first_trained` on are trained
    answer: str | None  # the reference answer a reward rule checks (task data), else None
    origin: str  # "file.jsonl:17" or "arithmetic:23 + 48"
    # A prompt/completion row trains its completion only (the last message), even when its prompt
    # holds earlier assistant turns: those are context someone else wrote, as in TRL's
    # completion-only loss. A `messages` row trains every assistant turn (0).
    first_trained: int = 0
    env: str | None = None  # the environment the demonstration acts in (calculator): held-out accuracy runs it
    question: list[dict] | None = None  # with an environment: the task's own messages, before the environment's

    @property
    def prompt(self) -> Messages:
        """The conversation before its last assistant turn: what a held-out evaluation asks."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]


@dataclass(frozen=True)
class DemonstrationSpec:
    """The SFT-only keys of ``rlctl sft``'s ``data`` group (the rest are ``SourceSpec``/``PromptFormat``)."""

    completion_field: str  # jsonl: the reply to train on, beside prompt_field
    messages_field: str  # jsonl: chat messages to train on (used when a row has it)
    max_tokens: int  # longer demonstrations are skipped
    pack: bool  # concatenate a micro-batch's demonstrations into rows of ≤ max_tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise ValueError(f"max_tokens: must be ≥ 8, got {self.max_tokens}")


def worked_sum(operands: list[int]) -> str:
    """Column addition written out: worked_sum([23, 48]) ==
    "23 + 48: 3 + 8 = 11, write 1 carry 1; 2 + 4 + 1 = 7; so 71". One column per digit of the
    longest operand, least significant first; a final carry is written as the leading digit."""
    expression = " + ".join(str(o) for o in operands)
    width = max(len(str(o)) for o in operands)
    columns, carry = [], 0
    for place in range(width):
        digits = [o // 10**place % 10 for o in operands if place < len(str(o))]
        terms = " + ".join(str(d) for d in digits) + (f" + {carry}" if carry else "")
        total = sum(digits) + carry
        carry = total // 10
        last = place == width - 1
        if carry and not last:
            columns.append(f"{terms} = {total}, write {total % 10} carry {carry}")
        else:
            columns.append(f"{terms} = {total}")
    return f"{expression}: {'; '.join(columns)}; so {sum(operands)}"


def _arithmetic(source: SourceSpec, fmt: PromptFormat, spec: DemonstrationSpec):
    if source.operators != "+":
        raise RlctlError(
            f"data.operators: the built-in demonstrations are worked additions; got operators={source.operators!r} "
            "(use data.operators=+, or your own demonstrations with data.source=jsonl)"
        )
    train, held_out = arithmetic(source)

    def demos(examples: list[Example]) -> list[Demonstration]:
        made = []
        for example in examples:
            operands = [int(x) for x in example.origin.split(":", 1)[1].split(" + ")]
            reply = {"role": "assistant", "content": worked_sum(operands)}
            made.append(Demonstration([*conversation(example, fmt), reply], example.answer, example.origin))
        return made

    return demos(train), demos(held_out)


def _calculator(source: SourceSpec, fmt: PromptFormat, spec: DemonstrationSpec):
    """Tool-use demonstrations for ``env=calculator``: the environment's own first messages (the tool's
    description, then the question), a reply that calls the calculator on the problem's expression, the
    calculator's result as the environment returns it, and a final reply that gives that number."""
    from rlctl.envs import CalculatorEnvironment, Task
    from rlctl.envs.tools import tool_call_text

    train, held_out = arithmetic(source)

    def demos(examples: list[Example]) -> list[Demonstration]:
        made = []
        for example in examples:
            env = CalculatorEnvironment()
            messages = env.reset(Task(conversation(example, fmt), example.answer, example.origin))
            call = tool_call_text("calculator", {"expression": example.origin.split(":", 1)[1]})
            observation = env.step(call).messages
            final = {"role": "assistant", "content": observation[0]["content"]}
            made.append(Demonstration([*messages, {"role": "assistant", "content": call}, *observation, final],
                                      example.answer, example.origin, env="calculator",
                                      question=conversation(example, fmt)))  # fmt: skip
        return made

    return demos(train), demos(held_out)


def _checked_messages(value, origin: str, field: str, needs_assistant: bool = True) -> Messages:
    if not (
        isinstance(value, list) and value
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    ):  # fmt: skip
        raise RlctlError(
            f"data: row {origin}: field {field!r} must be chat messages [{{'role': ..., 'content': ...}}, ...]"
        )
    if needs_assistant and not any(m["role"] == "assistant" for m in value):
        raise RlctlError(f"data: row {origin}: the conversation in {field!r} has no assistant turn to train on")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def demonstration_from_row(row: dict, origin: str, source: SourceSpec, fmt: PromptFormat,
                           spec: DemonstrationSpec) -> Demonstration:  # fmt: skip
    """A row with chat messages (every assistant turn trained), or with a prompt (string or
    messages) and a completion (the completion alone trained, whatever turns the prompt holds)."""
    first_trained = 0
    if spec.messages_field in row:
        messages = _checked_messages(row[spec.messages_field], origin, spec.messages_field)
        if fmt.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": fmt.system_prompt}, *messages]
    else:
        missing = [k for k in (source.prompt_field, spec.completion_field) if k not in row]
        if missing:
            raise RlctlError(
                f"data: row {origin} has no field {missing[0]!r} (fields: {sorted(row)}); a demonstration needs "
                f"{spec.messages_field!r}, or {source.prompt_field!r} and {spec.completion_field!r}"
            )
        completion = row[spec.completion_field]
        if not isinstance(completion, str) or not completion.strip():
            raise RlctlError(f"data: row {origin}: field {spec.completion_field!r} must be a non-empty string")
        prompt = row[source.prompt_field]
        if isinstance(prompt, list):
            prompt = _checked_messages(prompt, origin, source.prompt_field, needs_assistant=False)
        elif not isinstance(prompt, str) or not prompt.strip():
            raise RlctlError(
                f"data: row {origin}: field {source.prompt_field!r} must be a non-empty string or chat messages"
            )
        messages = [*conversation(Example(prompt, "", origin), fmt), {"role": "assistant", "content": completion}]
        first_trained = len(messages) - 1
    answer = row.get(source.answer_field)
    if answer is not None and not isinstance(answer, bool) and isinstance(answer, (str, int, float)):
        answer = gsm8k_final_answer(str(answer)) if source.answer_format == "gsm8k" else str(answer)
    else:
        answer = None
    return Demonstration(messages, answer, origin, first_trained)


def _jsonl(source: SourceSpec, fmt: PromptFormat, spec: DemonstrationSpec):
    if not source.path:
        raise RlctlError(f"data.path: the {source.source} source of rlctl sft needs a JSONL file (data.path=...)")
    demos = [
        demonstration_from_row(row, origin, source, fmt, spec) for origin, row in read_rows(source.path, source.split)
    ]
    if source.eval_path:
        held = [
            demonstration_from_row(row, origin, source, fmt, spec)
            for origin, row in read_rows(source.eval_path, source.eval_split)
        ]
        return demos, held
    return split_held_out(demos, source)


DEMONSTRATION_SOURCES = {"arithmetic": _arithmetic, "calculator": _calculator, "jsonl": _jsonl, "gsm8k": _jsonl}


def load_demonstrations(source: SourceSpec, fmt: PromptFormat, spec: DemonstrationSpec):
    """(training, held-out) demonstrations; held-out ones cut to ``data.eval_size``."""
    if source.source not in DEMONSTRATION_SOURCES:
        raise RlctlError(f"data.source: rlctl sft reads {sorted(DEMONSTRATION_SOURCES)}, got {source.source!r}")
    train, held_out = DEMONSTRATION_SOURCES[source.source](source, fmt, spec)
    if not train:
        raise RlctlError(f"data: the {source.source!r} source gave no demonstrations")
    return train, held_out[: source.eval_size]


# --- tokens and the loss mask ---------------------------------------------------------------------


def _template_text(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_demonstration(
    tokenizer, messages: Messages, origin: str = "", first_trained: int = 0
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation: mask 1 on each assistant turn's tokens (from
    message ``first_trained`` on: a preference pair's reply, not its prompt) and its end-of-turn
    token, 0 elsewhere. Through the chat template when the tokenizer has one (each
    assistant turn is located by rendering the conversation up to it); else "role: content" lines,
    each assistant turn followed by EOS."""
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            head = tokenizer(f"{m['role']}: ", add_special_tokens=False)["input_ids"]
            body = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
            trained = m["role"] == "assistant" and i >= first_trained
            tail = [eos] if m["role"] == "assistant" else tokenizer("\n", add_special_tokens=False)["input_ids"]
            ids += head + body + tail
            mask += [0] * len(head) + [int(trained)] * (len(body) + len(tail))
        return ids, mask
    ids = tokenizer(_template_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        before = tokenizer(_template_text(tokenizer, messages[:i], add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]  # fmt: skip
        upto = tokenizer(_template_text(tokenizer, messages[: i + 1]), add_special_tokens=False)["input_ids"]
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise RlctlError(
                f"data: row {origin}: this tokenizer's chat template does not render a conversation as the prefix of "
                "its continuation, so the assistant's tokens cannot be located; use data.chat_template=false"
            )
        end = len(upto)
        turn = upto[len(before) :]
        if eos in turn:  # the template may write "\n" after the end-of-turn token: not the model's to say
            end = len(before) + len(turn) - turn[::-1].index(eos)
        mask[len(before) : end] = [1] * (end - len(before))
    return ids, mask


@dataclass(frozen=True)
class EncodedDemonstrations:
    demonstrations: list[Demonstration]  # those kept, aligned with ids and masks
    ids: list[list[int]]
    masks: list[list[int]]  # 1 on the tokens the loss covers
    skipped: int  # longer than max_tokens

    def __len__(self) -> int:
        return len(self.ids)


def encode_demonstrations(demos: list[Demonstration], tokenizer, max_tokens: int) -> EncodedDemonstrations:
    kept, ids, masks, skipped = [], [], [], 0
    for demo in demos:
        tokens, mask = encode_demonstration(tokenizer, demo.messages, demo.origin, demo.first_trained)
        if len(tokens) > max_tokens:
            skipped += 1
            continue
        kept.append(demo)
        ids.append(tokens)
        masks.append(mask)
    return EncodedDemonstrations(kept, ids, masks, skipped)
