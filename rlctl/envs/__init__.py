"""Environments for multi-turn rollouts (``env=...``): the interface (:mod:`rlctl.envs.base`),
tools as typed functions (:mod:`rlctl.envs.tools`), the built-in calculator, and a user's class
from a file (``env.cls=path/to/file.py:ClassName``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from rlctl.envs.base import EnvSpec, Messages, Step, Task, checked_messages, checked_step
from rlctl.envs.calculator import CalculatorEnvironment, calculator
from rlctl.envs.tools import ToolEnvironment
from rlctl.errors import RlctlError
from rlctl.user_code import load_from_file

BUILT_IN = {"calculator": CalculatorEnvironment}  # name -> class taking timeout_s


def environment_factory(spec: EnvSpec) -> Callable[[], object] | None:
    """What makes one environment per trajectory, or None for single-turn rollouts (``env=none``).
    Checked here, before any model loads: the name is known, a user's class loads, has ``reset``
    and ``step`` methods, and can be made with no arguments."""
    if not spec.enabled:
        return None
    if spec.cls is not None:
        if spec.name not in ("none", "custom") or spec.tools:
            raise RlctlError(f"env.cls={spec.cls!r} and env.name={spec.name!r}: give one (env=custom env.cls=...)")
        cls = load_from_file(spec.cls, "env.cls", "class")
        missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
        if missing:
            raise RlctlError(f"env.cls: {cls.__name__} has no {' or '.join(missing)} method; an environment has "
                             "reset(task) -> messages and step(reply) -> Step (docs/multi-turn.md)")  # fmt: skip
        try:
            inspect.signature(cls).bind()
        except TypeError:
            raise RlctlError(f"env.cls: {cls.__name__}{inspect.signature(cls)} must be callable with no arguments "
                             "(one environment is made per trajectory)") from None  # fmt: skip
        return cls
    if spec.name == "custom":
        raise RlctlError("env=custom: set env.cls=path/to/file.py:ClassName")
    if spec.name == "tools":
        if not spec.tools:
            raise RlctlError("env=tools: list the tools, env.tools=[path/to/file.py:function, ...]")
        functions = [load_from_file(tool, "env.tools", "function") for tool in spec.tools]
        ToolEnvironment(functions)  # each has the type hints and docstring its schema is made from
        return partial(ToolEnvironment, functions, timeout_s=spec.tool_timeout_s)
    if spec.tools:
        raise RlctlError(f"env.tools: tools are for env=tools (got env.name={spec.name!r}); a class of yours can "
                         "subclass rlctl.envs.ToolEnvironment with them")  # fmt: skip
    if spec.name not in BUILT_IN:
        raise RlctlError(
            f"env.name: unknown environment {spec.name!r}; known: none, {', '.join(BUILT_IN)}, tools (env.tools), "
            "custom (env.cls)"
        )
    return partial(BUILT_IN[spec.name], timeout_s=spec.tool_timeout_s)


__all__ = ["BUILT_IN", "CalculatorEnvironment", "EnvSpec", "Messages", "Step", "Task", "ToolEnvironment",
           "calculator", "checked_messages", "checked_step", "environment_factory"]  # fmt: skip
