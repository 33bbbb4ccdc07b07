"""Rule rewards: ``fn(completion, answer, **params)`` registered by name.

A rule returns a float (one score for the whole completion), or a list of step rewards
``[(char_offset, reward), ...]``: process rewards, each credited to the token that covers that
character of the completion (e.g. the end of a line of reasoning). A correctness rule scores 1.0
for a right answer and 0.0 otherwise, so the mean of its score is the accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import torch

from rlctl.errors import RlctlError

RULES: dict[str, Callable[..., float]] = {}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def rule(name: str):
    def add(fn):
        RULES[name] = fn
        return fn

    return add


def parse_number(text: str) -> Decimal | None:
    """ "1,234" -> 1234, "3.50" -> 3.5; None when it is not a number."""
    try:
        return Decimal(text.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def same_number(found: str | None, answer: str) -> bool:
    if found is None:
        return False
    a, b = parse_number(found), parse_number(answer.strip())
    return a is not None and b is not None and a == b


@rule("exact_number")
def exact_number(completion: str, answer: str) -> float:
    """1 if the first number in the completion equals the answer numerically ("7", "7.0", "The answer is 7")."""
    match = _NUMBER.search(completion)
    return float(same_number(match.group(0) if match else None, answer))


@rule("gsm8k")
def gsm8k(completion: str, answer: str) -> float:
    """1 if the number after the last "####" (else the last number in the completion) equals the answer."""
    tail = completion.split("####")[-1] if "####" in completion else completion
    numbers = _NUMBER.findall(tail)
    chosen = (numbers[0] if "####" in completion else numbers[-1]) if numbers else None
    return float(same_number(chosen, answer))


@rule("math_verify")
def math_verify(completion: str, answer: str) -> float:
    """1 if math-verify finds the completion's final answer equivalent to the reference (LaTeX or plain)."""
    from math_verify import parse, verify  # imported here: sympy takes a second to load

    gold, predicted = parse(answer), parse(completion)
    if not gold or not predicted:
        return 0.0
    return float(verify(gold, predicted))


@rule("format")
def format_match(completion: str, answer: str, pattern: str | None = None) -> float:
    """1 if the regex ``pattern`` matches anywhere in the completion (re.search with DOTALL)."""
    if not pattern:
        raise RlctlError("reward.terms: the 'format' reward needs a pattern (e.g. {name: format, pattern: '####'})")
    return float(re.search(pattern, completion, flags=re.DOTALL) is not None)


StepRewards = list[tuple[int, float]]  # (character offset in the completion, reward)


@dataclass(frozen=True)
class RewardResult:
    scores: torch.Tensor  # [N] weighted sum of the terms (step rewards summed)
    correct: torch.Tensor  # [N] bool: the accuracy term scored 1
    per_term: dict[str, torch.Tensor]  # term name -> [N] unweighted scores
    steps: list[StepRewards] | None = None  # per completion, weighted; None when every term gave one score


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    params: dict


class WeightedRewards:
    """score = Σ_k w_k · rule_k(completion, answer); accuracy from one designated term."""

    def __init__(self, terms: list[Term], accuracy_term: int = 0):
        if not terms:
            raise RlctlError("reward.terms: at least one reward term is needed")
        for term in terms:
            if term.name not in RULES:
                raise RlctlError(f"reward.terms: unknown reward {term.name!r}; known: {sorted(RULES)}")
        if not 0 <= accuracy_term < len(terms):
            raise RlctlError(f"reward.accuracy_term: {accuracy_term} is not an index of the {len(terms)} terms")
        self.terms, self.accuracy_term = terms, accuracy_term

    def __call__(self, completions: list[str], answers: list[str]) -> RewardResult:
        per_term: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions))
        steps: list[StepRewards] = [[] for _ in completions]
        any_steps = False
        for index, term in enumerate(self.terms):
            fn = RULES[term.name]
            values = []
            for row, (completion, answer) in enumerate(zip(completions, answers)):
                value = fn(completion, answer, **term.params)
                if isinstance(value, (list, tuple)):  # step rewards
                    any_steps = True
                    steps[row] += [(int(offset), term.weight * float(r)) for offset, r in value]
                    value = sum(float(r) for _, r in value)
                else:  # one score, credited at the end of the completion
                    steps[row].append((len(completion), term.weight * float(value)))
                values.append(float(value))
            scores = torch.tensor(values, dtype=torch.float32)
            key = term.name if term.name not in per_term else f"{term.name}_{index}"
            per_term[key] = scores
            total += term.weight * scores
        correct = list(per_term.values())[self.accuracy_term] >= 1.0
        return RewardResult(total, correct, per_term, steps if any_steps else None)
