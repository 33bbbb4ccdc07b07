"""What an environment is: a small class with ``reset(task)`` and ``step(reply)``.

A multi-turn rollout makes one environment per trajectory. ``reset`` gets the task (the prompt's
chat messages, with the data's template and system prompt applied, and the reference answer) and
returns the first messages the policy sees. After each reply of the policy, ``step`` gets the
reply's text and returns a :class:`Step`: the observation (chat messages: a tool's result, a
user's answer), whether the episode is over, and this turn's reward (placed on the turn's last
token). A plain tuple ``(messages, done)`` or ``(messages, done, reward)`` is accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlctl.errors import RlctlError, check_fields

Messages = list[dict]


@dataclass(frozen=True)
class Task:
    """What an environment starts from."""

    messages: Messages  # the prompt as chat messages (data.prompt_template and data.system_prompt applied)
    answer: str  # the reference answer ("" when the data has none)
    origin: str = ""  # where the prompt came from ("arithmetic:123 * 4", "file.jsonl:17")


@dataclass(frozen=True)
class Step:
    """The environment's answer to one reply of the policy."""

    messages: Messages = field(default_factory=list)  # the observation shown next (empty when done)
    done: bool = True  # the episode is over: the last reply is the final answer
    reward: float = 0.0  # this turn's reward, on the turn's last token (added to the final answer's score)
    tool_calls: int = 0  # tools this reply called
    tool_errors: int = 0  # of those, calls that failed (the error went back to the policy as text)


@dataclass(frozen=True)
class EnvSpec:
    """The ``env`` config group, filled by field name."""

    name: str = "none"  # none (one turn) | calculator | tools (env.tools) | custom (env.cls)
    cls: str | None = None  # path/to/file.py:ClassName, a class with reset(task) and step(reply)
    tools: list[str] = field(default_factory=list)  # tools: typed, documented functions, path/to/file.py:function
    max_turns: int = 4  # replies of the policy per trajectory
    max_observation_tokens: int = 64  # longer observations are cut to this many tokens (and counted)
    max_total_tokens: int = 0  # replies and observations of one trajectory (0 = what max_turns allows)
    mask_truncated: bool = False  # trajectories that hit a limit take no part in the loss
    tool_timeout_s: float = 5.0  # a tool call taking longer returns an error to the policy

    def __post_init__(self) -> None:
        checks = (
            ("max_turns", self.max_turns >= 1, "must be ≥ 1 (one reply at least)"),
            ("max_observation_tokens", self.max_observation_tokens >= 1, "must be ≥ 1"),
            ("max_total_tokens", self.max_total_tokens >= 0, "must be ≥ 0 (0 = what max_turns allows)"),
            ("tool_timeout_s", self.tool_timeout_s > 0, "must be > 0"),
        )
        check_fields(self, checks)

    @property
    def enabled(self) -> bool:
        return self.name != "none" or self.cls is not None

    def describe(self, max_new_tokens: int) -> str:
        """The line the dry run and the run's start print ("" without an environment)."""
        if not self.enabled:
            return ""
        name = self.cls or (f"tools {', '.join(self.tools)}" if self.name == "tools" else self.name)
        return (f"multi-turn: env {name}, ≤ {self.max_turns} replies of ≤ {max_new_tokens} tokens, observations cut "
                f"at {self.max_observation_tokens} tokens; the largest trajectory: ≤ "
                f"{self.total_tokens(max_new_tokens)} tokens after its prompt (observations attended, not trained)"
                f"{'; truncated ones masked' if self.mask_truncated else ''}")  # fmt: skip

    def total_tokens(self, max_new_tokens: int) -> int:
        """The longest trajectory after its prompt: every reply at its limit, every observation at its."""
        allowed = self.max_turns * max_new_tokens + (self.max_turns - 1) * self.max_observation_tokens
        return min(self.max_total_tokens, allowed) if self.max_total_tokens else allowed


def checked_messages(value, where: str) -> Messages:
    """``value`` as chat messages, or a one-line error naming ``where`` (the class and method)."""
    if not (
        isinstance(value, (list, tuple))
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    ):  # fmt: skip
        shown = repr(value)
        raise RlctlError(
            f"{where} must return chat messages [{{'role': ..., 'content': ...}}, ...], got "
            f"{shown[:80] + '...' if len(shown) > 80 else shown}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def checked_step(value, where: str) -> Step:
    """A :class:`Step` from what ``step`` returned: a Step, or (messages, done[, reward])."""
    if isinstance(value, Step):
        return Step(checked_messages(value.messages, where), bool(value.done), float(value.reward),
                    value.tool_calls, value.tool_errors)  # fmt: skip
    if isinstance(value, tuple) and len(value) in (2, 3) and isinstance(value[1], bool):
        reward = value[2] if len(value) == 3 else 0.0
        if not isinstance(reward, (int, float)) or isinstance(reward, bool):
            raise RlctlError(f"{where} returned a reward of type {type(reward).__name__}; a number is needed")
        return Step(checked_messages(value[0], where), value[1], float(reward))
    raise RlctlError(
        f"{where} must return rlctl.envs.Step(messages, done, reward) or a tuple (messages, done[, reward]), "
        f"got {type(value).__name__}"
    )
