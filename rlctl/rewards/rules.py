"""Rule rewards: ``fn(completion, answer, **params)`` registered by name.

A rule returns a float (one score for the whole completion), or a list of step rewards
``[(char_offset, reward), ...]``: process rewards, each credited to the token that covers that
character of the completion (e.g. the end of a line of reasoning). A correctness rule scores 1.0
for a right answer and 0.0 otherwise, so the mean of its score is the accuracy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from rlctl.errors import RlctlError, check_fields
from rlctl.user_code import load_from_file

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

    # math-verify's own time limits use signal.alarm, which works only in the main thread; rlctl runs
    # reward calls in a worker thread with its own limit (reward.timeout_s), so they are turned off.
    gold, predicted = parse(answer, parsing_timeout=None), parse(completion, parsing_timeout=None)
    if not gold or not predicted:
        return 0.0
    return float(verify(gold, predicted, timeout_seconds=None))


@rule("format")
def format_match(completion: str, answer: str, pattern: str | None = None) -> float:
    """1 if the regex ``pattern`` matches anywhere in the completion (re.search with DOTALL)."""
    if not pattern:
        raise RlctlError("reward.terms: the 'format' reward needs a pattern (e.g. {name: format, pattern: '####'})")
    return float(re.search(pattern, completion, flags=re.DOTALL) is not None)


def load_user_reward(spec: str, key: str = "reward.fn") -> Callable[..., float]:
    """A reward function from a file: ``"path/to/my_reward.py:score"``, where ``score(completion, answer)``
    returns a float (or step rewards, see the module docstring). ``key`` names the setting in errors."""
    fn = load_from_file(spec, key, "function")
    file, name = Path(spec.rpartition(":")[0]).expanduser(), spec.rpartition(":")[2]
    signature = inspect.signature(fn)
    if "completions" in signature.parameters:  # TRL's batched convention
        answers_name = "answers" if "answers" in signature.parameters else "answer"
        try:
            signature.bind(completions=[], **({answers_name: []} if answers_name in signature.parameters else {}))
        except TypeError:
            raise RlctlError(
                f"{key}: {name}{signature} in {file}: a batched reward gets completions= and answers= (lists) "
                "and returns a list of scores; it may not require other arguments"
            ) from None
        return BatchedReward(fn, answers_name, takes_prompts="prompts" in signature.parameters)
    try:
        signature.bind("completion", "answer")
    except TypeError:
        raise RlctlError(
            f"{key}: {name}{signature} in {file} must accept (completion, answer) and return a score, or, "
            "batched as in TRL, (completions, answers) and return a list of scores"
        ) from None
    return fn


@dataclass(frozen=True)
class BatchedReward:
    """A user reward called once per batch: fn(completions=[...], answers=[...]) -> [score or None]
    (TRL's convention; None, like a failure, scores the fallback). A function that also takes
    ``prompts`` gets each prompt's chat messages."""

    fn: Callable[..., list]
    answers_name: str  # the keyword its reference answers go in: "answers" (or TRL-style "answer")
    takes_prompts: bool = False
    time_limited = True  # user code: runs in a worker thread under reward.timeout_s

    def __call__(self, prompts: list, completions: list[str], answers: list[str]) -> list:
        extra = {"prompts": prompts} if self.takes_prompts else {}
        values = self.fn(completions=completions, **{self.answers_name: answers}, **extra)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"a list of {len(values)}" if isinstance(values, (list, tuple)) else type(values).__name__
            raise TypeError(
                f"returned {got} for {len(completions)} completions; a batched reward returns one score each"
            )
        return list(values)


def resolve_rule(name: str) -> Callable[..., float]:
    """A registered rule by name, or a user function when the name is "file.py:function"."""
    if ".py:" in name:
        return load_user_reward(name)
    if name not in RULES:
        raise RlctlError(
            f"reward.terms: unknown reward {name!r}; known: {sorted([*RULES, *SCORERS])} or 'path/to/file.py:function'"
        )
    return RULES[name]


StepRewards = list[tuple[int, float]]  # (character offset in the completion, reward)

# Terms that score a whole batch with a model or a server; build makes them from the reward group's
# keys (reward.model_path, reward.url, ...) and hands them to WeightedRewards by name.
SCORERS = ("reward_model", "http", "judge")


def term_meaning(name: str) -> str:
    """What `accuracy` counts when a reward term decides it."""
    return f"reward term {name!r} scores ≥ 1"


@dataclass(frozen=True)
class RewardSpec:
    """The rule keys of the ``reward`` group, filled by field name (the scorers' keys go to their specs)."""

    terms: list  # [{"name", "weight", "pattern"}]
    fn: str | None  # a user function "file.py:function" replacing the terms
    accuracy_term: int
    accuracy: str  # what counts as a correct answer: auto | term | a rule's name | "file.py:function"
    timeout_s: float
    fallback: float
    on_error: str
    max_failed_steps: int

    def __post_init__(self) -> None:
        checks = (("timeout_s", self.timeout_s >= 0, "must be ≥ 0 (0 = no limit)"),
                  ("fallback", math.isfinite(self.fallback), "must be a finite number"),
                  ("on_error", self.on_error in ("fallback", "stop"), "must be 'fallback' or 'stop'"),
                  ("max_failed_steps", self.max_failed_steps >= 1, "must be ≥ 1"),
                  ("accuracy", self.accuracy in ("auto", "term", *RULES) or ".py:" in self.accuracy,
                   f"must be auto, term, one of the rules {sorted(RULES)} or 'path/to/file.py:function'"))  # fmt: skip
        check_fields(self, checks)

    def accuracy_rule(self, answer_format: str = "plain") -> tuple[Callable | None, str]:
        """(the rule that decides `accuracy`, or None for "the accuracy term's score ≥ 1"; what it means in words)."""
        choice = self.accuracy
        if choice == "auto":
            choice = ("gsm8k" if answer_format == "gsm8k" else "exact_number") if self.fn else "term"
        if choice == "term":
            name = self.term_list()[self.accuracy_term].name if 0 <= self.accuracy_term < len(self.term_list()) else "?"
            return None, term_meaning(name)
        if choice in RULES:
            return RULES[choice], f"the {choice} rule says the answer is right"
        return load_user_reward(choice, key="reward.accuracy"), f"{choice} returns true"

    def term_list(self) -> list[Term]:
        if self.fn:
            return [Term(self.fn, 1.0, {})]
        return [Term(t["name"], t["weight"], {"pattern": t["pattern"]} if t["pattern"] is not None else {})
                for t in self.terms]  # fmt: skip


@dataclass(frozen=True)
class RewardResult:
    scores: torch.Tensor  # [N] weighted sum of the terms (step rewards summed)
    correct: torch.Tensor  # [N] bool: the accuracy term scored 1
    per_term: dict[str, torch.Tensor]  # term name -> [N] unweighted scores
    steps: list[StepRewards] | None = None  # per completion, weighted; None when every term gave one score
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)  # term -> (failed calls, first error)

    def fully_failed(self) -> str | None:
        """The first term that failed on every completion of this call, if any."""
        n = len(self.scores)
        return next((name for name, (count, _) in self.failures.items() if n and count == n), None)


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    params: dict


class RewardFailure(RlctlError):
    """A reward function raised or ran out of time and reward.on_error is "stop"."""


class WeightedRewards:
    """score = Σ_k w_k · rule_k(completion, answer); accuracy from one designated term.

    Each call runs in a worker thread with a time limit; a call that raises, times out or returns
    something that is not a finite number scores ``fallback`` and is counted in ``errors`` (or, with
    ``on_error="stop"``, raises :class:`RewardFailure`). A timed-out call is abandoned, not killed.
    """

    def __init__(
        self,
        terms: list[Term],
        accuracy_term: int = 0,
        timeout_s: float = 10.0,
        fallback: float = 0.0,
        on_error: str = "fallback",
        scorers: dict | None = None,
        accuracy_rule: Callable | None = None,
        accuracy_meaning: str = "",
    ):
        if not terms:
            raise RlctlError("reward.terms: at least one reward term is needed")
        if not 0 <= accuracy_term < len(terms):
            raise RlctlError(f"reward.accuracy_term: {accuracy_term} is not an index of the {len(terms)} terms")
        if on_error not in ("fallback", "stop"):
            raise RlctlError(f"reward.on_error: must be 'fallback' or 'stop', got {on_error!r}")
        self.terms, self.accuracy_term = terms, accuracy_term
        scorers = scorers or {}  # term name -> a batch scorer built from its settings (a model, a server)
        self.functions = [scorers[term.name] if term.name in scorers else resolve_rule(term.name) for term in terms]
        self.timeout_s, self.fallback, self.on_error = timeout_s, fallback, on_error
        # what `accuracy` counts: a rule of its own, or (None) the accuracy term's score ≥ 1
        self.accuracy_rule = accuracy_rule
        self.accuracy_meaning = accuracy_meaning or term_meaning(terms[accuracy_term].name)
        self.errors = 0  # calls that failed since construction
        self._failures: dict[str, tuple[int, str]] = {}  # of the current call: term -> (count, first error)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` within reward.timeout_s (0 = no limit); a call that runs over raises
        TimeoutError and is abandoned with its thread (later calls get a new one)."""
        if self.timeout_s <= 0:
            return fn(*args, **kwargs)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        try:
            return self._pool.submit(fn, *args, **kwargs).result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise TimeoutError(f"took longer than reward.timeout_s={self.timeout_s}s") from None

    def _call(self, fn, term: Term, completion: str, answer: str):
        try:
            value = self._run(fn, completion, answer, **term.params)
            if not isinstance(value, (list, tuple)) and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise TypeError(f"returned {value!r}, not a finite number or a list of step rewards")
            return value
        except RlctlError:
            raise
        except Exception as err:  # the reward is user code: any failure becomes the fallback score
            return self._fail(term, err, completion)

    def _fail(self, term: Term, err: Exception, completion: str, samples: int = 1) -> float:
        """Count ``samples`` failed samples of ``term`` and give the fallback (or stop, with on_error=stop)."""
        self.errors += samples
        count, first = self._failures.get(term.name, (0, f"{type(err).__name__}: {err}"))
        self._failures[term.name] = (count + samples, first)
        if self.on_error == "stop":
            raise RewardFailure(
                f"reward {term.name!r} failed on completion {completion[:80]!r}: {type(err).__name__}: {err}"
            ) from None
        return self.fallback

    def _call_batched(self, fn, term: Term, prompts: list, completions: list[str], answers: list[str]) -> list:
        """One call for the whole batch: if it fails every sample gets the fallback; a None or
        non-finite entry gives that sample the fallback."""
        try:
            if fn.time_limited:
                values = self._run(fn, prompts, completions, answers)
            else:
                values = fn(prompts, completions, answers)
        except RlctlError:
            raise
        except Exception as err:
            return [self._fail(term, err, "(a batch)", samples=len(completions))] * len(completions)
        return [
            v if isinstance(v, (int, float)) and math.isfinite(v) or isinstance(v, (list, tuple))
            else self._fail(term, TypeError(f"returned {v!r} for one completion"), completion)
            for v, completion in zip(values, completions)
        ]  # fmt: skip

    def state_dict(self) -> dict:
        """What the terms learn while scoring (a reward model's running moments), for checkpoints."""
        return {term.name: fn.state_dict() for term, fn in zip(self.terms, self.functions) if hasattr(fn, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for term, fn in zip(self.terms, self.functions):
            if term.name in state and hasattr(fn, "load_state_dict"):
                fn.load_state_dict(state[term.name])

    @contextlib.contextmanager
    def evaluating(self):
        """Score without learning from it: a reward model's running moments stay as training left them."""
        stateful = [fn for fn in self.functions if hasattr(fn, "learning")]
        for fn in stateful:
            fn.learning = False
        try:
            yield self
        finally:
            for fn in stateful:
                fn.learning = True

    def __call__(self, completions: list[str], answers: list[str], prompts: list | None = None) -> RewardResult:
        """Score each completion; ``prompts`` are the chats they answer (the batch scorers need them)."""
        self._failures = {}
        prompts = prompts if prompts is not None else [[] for _ in completions]
        per_term: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions))
        steps: list[StepRewards] = [[] for _ in completions]
        any_steps = False
        for index, (term, fn) in enumerate(zip(self.terms, self.functions)):
            values = []
            batched = hasattr(fn, "time_limited")  # a BatchedReward or a scorer: one call for the batch
            batch_values = self._call_batched(fn, term, prompts, completions, answers) if batched else None
            for row, (completion, answer) in enumerate(zip(completions, answers)):
                value = batch_values[row] if batch_values is not None else self._call(fn, term, completion, answer)
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
        if self.accuracy_rule is None:
            correct = list(per_term.values())[self.accuracy_term] >= 1.0
        else:
            judge = Term("accuracy", 1.0, {})
            correct = torch.tensor([float(self._call(self.accuracy_rule, judge, c, a)) >= 1.0
                                    for c, a in zip(completions, answers)], dtype=torch.bool)  # fmt: skip
        for fn in self.functions:  # a scorer's own per-sample figures (an ensemble's disagreement), after the terms
            per_term.update(getattr(fn, "last_stats", {}))
        return RewardResult(total, correct, per_term, steps if any_steps else None, dict(self._failures))
