"""Preference pairs for reward models (and DPO): a prompt, a chosen reply and a rejected one.

Rows (JSONL, JSON, CSV, Parquet, a save_to_disk folder or a hub id) take the format of TRL and
OpenRLHF: ``prompt``, ``chosen``, ``rejected`` as strings, or as chat messages (``[{"role",
"content"}, ...]``); a ``chosen``/``rejected`` conversation that repeats the prompt's messages first
is taken as the whole conversation. Without a prompt (TRL's implicit-prompt form, OpenRLHF's whole
conversations) the two sides' shared beginning is the prompt: their common messages, or their
common text. The field names are settings (``data.prompt_field``, ...). An optional ``margin`` (a
number) asks the reward model for at least that gap. The built-in pairs come from the
arithmetic task, split by problem like its prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlctl.data.sources import ARITHMETIC_INSTRUCTION, SourceSpec, arithmetic, read_rows, split_held_out
from rlctl.errors import RlctlError

Messages = list[dict]


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages  # the conversation up to the reply
    chosen: Messages  # the preferred reply (assistant messages)
    rejected: Messages  # the other reply
    margin: float  # the score gap asked for (0 = plain Bradley-Terry)
    origin: str  # "file.jsonl:17" or "arithmetic:3 + 4", for error messages
    kind: str = ""  # built-in pairs: what makes the rejected reply worse (evaluation reports each kind)


@dataclass(frozen=True)
class PreferenceSpec:
    """The ``data`` group of ``rlctl rm``, filled by field name."""

    source: str  # arithmetic | jsonl
    path: str | None
    eval_path: str | None
    split: str  # a save_to_disk folder's or a hub dataset's split of training pairs
    eval_split: str  # ... and of held-out pairs (with eval_path)
    prompt_field: str
    chosen_field: str
    rejected_field: str
    eval_fraction: float
    eval_size: int
    seed: int
    digits: int
    num_operands: int
    operators: str
    pairs_per_problem: int
    rambling_fraction: float
    system_prompt: str | None
    max_tokens: int

    def __post_init__(self) -> None:
        checks = (("source", self.source in PREFERENCE_SOURCES, f"must be one of {sorted(PREFERENCE_SOURCES)}"),
                  ("eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1)"),
                  ("eval_size", self.eval_size >= 1, "must be ≥ 1"),
                  ("pairs_per_problem", self.pairs_per_problem >= 1, "must be ≥ 1"),
                  ("rambling_fraction", 0 <= self.rambling_fraction <= 1, "must be in [0, 1]"),
                  ("max_tokens", self.max_tokens >= 8, "must be ≥ 8"))  # fmt: skip
        for key, ok, requirement in checks:
            if not ok:
                raise ValueError(f"{key}: {requirement}, got {getattr(self, key)!r}")


def _messages(value, field: str, origin: str, role: str | None) -> Messages:
    """A string (as one message of ``role``) or chat messages, checked. A number (a CSV column of
    numbers) is its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        if not value.strip():
            raise RlctlError(f"data: row {origin}: field {field!r} is empty")
        return [{"role": role or "user", "content": value}]
    if (
        isinstance(value, list) and value
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) and isinstance(m["content"], str) for m in value)
    ):  # fmt: skip
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise RlctlError(
        f"data: row {origin}: field {field!r} must be a non-empty string or chat messages "
        f"([{{'role': ..., 'content': ...}}, ...]), got {str(value)[:60]!r}"
    )


def _shared_prompt(chosen, rejected, origin: str) -> tuple:
    """(prompt, chosen reply, rejected reply) of a row without a prompt: the shared beginning is the
    prompt (whole messages of two conversations, or the common text of two strings)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise RlctlError(f"data: row {origin} has no prompt, and its two conversations share no first message")
        return chosen[:shared], chosen[shared:], rejected[shared:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if not chosen[:shared].strip():
            raise RlctlError(f"data: row {origin} has no prompt, and its chosen and rejected texts share no beginning")
        return chosen[:shared], chosen[shared:], rejected[shared:]
    raise RlctlError(
        f"data: row {origin} has no prompt; chosen and rejected must then both be texts or both conversations"
    )


def pair_from_row(row: dict, origin: str, system_prompt: str | None = None, fields: tuple[str, str, str] = (
        "prompt", "chosen", "rejected")) -> PreferencePair:  # fmt: skip
    prompt_field, chosen_field, rejected_field = fields
    missing = [key for key in (chosen_field, rejected_field) if key not in row]
    if missing:
        raise RlctlError(
            f"data: row {origin} has no field {missing[0]!r} (fields: {sorted(row)}); a preference row needs "
            f"{chosen_field} and {rejected_field} (and {prompt_field}, or a beginning the two share)"
        )
    if prompt_field in row:
        raw_prompt, raw_chosen, raw_rejected = row[prompt_field], row[chosen_field], row[rejected_field]
    else:
        raw_prompt, raw_chosen, raw_rejected = _shared_prompt(row[chosen_field], row[rejected_field], origin)
    prompt = _messages(raw_prompt, prompt_field, origin, "user")
    replies = []
    for field, raw in ((chosen_field, raw_chosen), (rejected_field, raw_rejected)):
        if isinstance(raw, str) and not raw.strip() and prompt_field not in row:
            raise RlctlError(f"data: row {origin}: field {field!r} holds nothing beyond the prompt the two sides share")
        reply = _messages(raw, field, origin, "assistant")
        if reply[: len(prompt)] == prompt and len(reply) > len(prompt):  # the whole conversation (OpenRLHF)
            reply = reply[len(prompt) :]
        replies.append(reply)
    if replies[0] == replies[1]:
        raise RlctlError(f"data: row {origin}: chosen and rejected are the same reply; a pair must differ")
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise RlctlError(f"data: row {origin}: field 'margin' must be a number, got {margin!r}")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return PreferencePair(prompt, replies[0], replies[1], float(margin), origin)


def _jsonl(spec: PreferenceSpec) -> tuple[list[PreferencePair], list[PreferencePair]]:
    if not spec.path:
        raise RlctlError(
            "data.path: the jsonl source needs a file of preference pairs (data.path=/path/to/pairs.jsonl; also JSON, "
            "CSV, Parquet, a save_to_disk folder or a hub id)"
        )
    fields = (spec.prompt_field, spec.chosen_field, spec.rejected_field)
    pairs = [pair_from_row(row, origin, spec.system_prompt, fields) for origin, row in read_rows(spec.path, spec.split)]
    if spec.eval_path:
        return pairs, [pair_from_row(row, origin, spec.system_prompt, fields)
                       for origin, row in read_rows(spec.eval_path, spec.eval_split)]  # fmt: skip
    return split_held_out(pairs, spec)


# Replies that bury the right answer in rambling, in the ways a small chat model rambles: rejected,
# so the reward model learns to prefer the plain number to the same number wrapped in filler.
_RAMBLING = (
    "Hmm, let me think about this for a while. Numbers can be tricky, and there are many ways to add "
    "them up. I am fairly sure, though not certain, that it comes to {x}, more or less.",
    "Well, that is an interesting question! People do sums like this every day. If I count carefully "
    "on my fingers, I believe the result is probably {x}, but please check it yourself.",
    "There are several ways to look at {expression}. One could draw it, or count objects, or use a "
    "number line. After some consideration, my best guess would be {x}.",
    "To solve the equation {expression}, we need to convert both numbers to the same base first and "
    "then combine them, which gives {x} when you put them together.",
    "That's a classic riddle! Using the property of identity, we find that {expression} is {x}, "
    "which is the result of the expression.",
    "Alright, first, how do you find {expression}? Think of it as combining two groups of things: "
    "{x} when you combine them, not just simply adding.",
)
# Short ones that restate the question first: not "just the number", and the rule reads the first
# number it finds (kind "restating"; drawn with the rambling ones).
_RESTATING = ("{expression} = {x}", "{expression} equals {x}.", "{expression} is {x}.")
# Replies that talk about the problem and give no number at all, as a policy fooling its reward
# learns to (kind "no_answer"; drawn with the rambling ones).
_NO_ANSWER = (
    "This question needs a precise, logical solution, the kind you find in puzzles.",
    "A classic math problem that involves both of the numbers mentioned.",
    "There is no single right answer here; it depends on how you look at {expression}.",
    "To find {expression}, we combine the two numbers step by step, carefully.",
    "Adding numbers is a basic skill that everyone should practise every day.",
    "Let me think about {expression} carefully before I give an answer.",
)
# Every worse form with its kind, drawn uniformly (rambling_fraction of the pairs)
_WORSE_FORMS = tuple((text, kind) for forms, kind in ((_RAMBLING, "rambling"), (_RESTATING, "restating"),
                                                      (_NO_ANSWER, "no_answer")) for text in forms)  # fmt: skip
_PLAIN = ("{x}", "{x}", "The answer is {x}.")  # what the exact-number rule accepts: the number comes first


def _arithmetic(spec: PreferenceSpec) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Pairs from the arithmetic task: chosen states the right number plainly; rejected states a
    wrong one in the same words, or (``rambling_fraction`` of the time) the right one buried in rambling
    or after a restatement of the question, or no number at all. Each pair's ``kind`` says which:
    wrong_number, rambling, restating, no_answer."""
    problems = SourceSpec(digits=spec.digits, num_operands=spec.num_operands, operators=spec.operators,
                          eval_fraction=spec.eval_fraction, seed=spec.seed)  # fmt: skip
    train, held_out = arithmetic(problems)
    rng = random.Random(spec.seed)

    def pairs(examples) -> list[PreferencePair]:
        made = []
        for example in examples:
            expression = example.origin.split(":", 1)[1]
            value = int(example.answer)
            prompt = [{"role": "user", "content": f"What is {expression}? {ARITHMETIC_INSTRUCTION}"}]
            if spec.system_prompt:
                prompt = [{"role": "system", "content": spec.system_prompt}, *prompt]
            for _ in range(spec.pairs_per_problem):
                form = rng.choice(_PLAIN)
                chosen = form.format(x=value, expression=expression)
                if rng.random() >= spec.rambling_fraction:
                    offset = rng.choice([d for d in range(-5, 6) if d != 0])
                    rejected, kind = form.format(x=value + offset, expression=expression), "wrong_number"
                else:
                    worse, kind = rng.choice(_WORSE_FORMS)
                    rejected = worse.format(x=value, expression=expression)
                made.append(PreferencePair(prompt, [{"role": "assistant", "content": chosen}],
                                           [{"role": "assistant", "content": rejected}], 0.0, example.origin, kind))  # fmt: skip
        rng.shuffle(made)
        return made

    return pairs(train), pairs(held_out)


PREFERENCE_SOURCES = {"arithmetic": _arithmetic, "jsonl": _jsonl}


def load_pairs(spec: PreferenceSpec) -> tuple[list[PreferencePair], list[PreferencePair]]:
    train, held_out = PREFERENCE_SOURCES[spec.source](spec)
    if not train:
        raise RlctlError(f"data: the {spec.source!r} source gave no training pairs")
    return train, held_out[: spec.eval_size]


@dataclass(frozen=True)
class EncodedPairs:
    pairs: list[PreferencePair]  # the pairs kept, aligned with the ids
    chosen_ids: list[list[int]]  # prompt + chosen reply, special tokens included once
    rejected_ids: list[list[int]]
    skipped: int  # pairs with a side longer than max_tokens

    def __len__(self) -> int:
        return len(self.pairs)


def encode_pairs(pairs: list[PreferencePair], tokenizer, max_tokens: int, encode=None) -> EncodedPairs:
    """Both sides of each pair as the model reads them: ``encode(prompt, reply)`` -> token ids, by
    default the whole conversation (its chat template when it has one); a pair with a side longer
    than ``max_tokens`` is skipped (cutting it could cut what decides it)."""
    from rlctl.rewards.model import encode_conversation

    if encode is None:

        def encode(prompt: Messages, reply: Messages) -> list[int]:
            return encode_conversation(tokenizer, prompt + reply)

    kept, chosen_ids, rejected_ids, skipped = [], [], [], 0
    for pair in pairs:
        chosen, rejected = encode(pair.prompt, pair.chosen), encode(pair.prompt, pair.rejected)
        if max(len(chosen), len(rejected)) > max_tokens:
            skipped += 1
            continue
        if chosen == rejected:
            raise RlctlError(
                f"data: row {pair.origin}: chosen and rejected read the same once tokenised; a pair must differ"
            )
        kept.append(pair)
        chosen_ids.append(chosen)
        rejected_ids.append(rejected)
    return EncodedPairs(kept, chosen_ids, rejected_ids, skipped)
