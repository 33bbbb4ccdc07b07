"""Tools as plain Python functions, as users write them for TRL: typed arguments and a docstring
whose ``Args:`` section describes each. :class:`ToolEnvironment` shows the policy their JSON
schemas in the system message, and turns each tool call in a reply into the function's result.

A tool call is the Hermes / Qwen convention that chat models are taught:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12 * 7"}}
    </tool_call>

A reply without a tool call is the final answer and ends the episode. A call that cannot be read,
names no known tool, has the wrong arguments, raises or runs past ``timeout_s`` gets its error back
as the tool's message (the policy can read it and try again) and is counted as a tool error.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
from collections.abc import Callable

from rlctl.envs.base import Messages, Step, Task
from rlctl.errors import RlctlError

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

SYSTEM_TEMPLATE = (
    "You can call these tools:\n{tools}\n"
    'To call one, write <tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call> and stop; its result comes '
    "back as a message from the tool. When you know the answer, reply without a tool call."
)


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a typed, documented function (transformers' reader of type hints and
    Google-style docstrings); a one-line error when it lacks either."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # transformers raises its own error types for a missing hint or docstring
        name = getattr(fn, "__name__", repr(fn))
        raise RlctlError(
            f"env: tool {name!r} needs type hints on every argument and a docstring with an Args: section "
            f"({type(err).__name__}: {err})"
        ) from None


def tool_call_text(name: str, arguments: dict) -> str:
    """A tool call as the policy writes it."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def tool_calls(reply: str) -> list[str]:
    """The bodies of the ``<tool_call>...</tool_call>`` blocks of a reply, in order."""
    return TOOL_CALL.findall(reply)


class ToolEnvironment:
    """An episode in which the policy may call ``tools`` (functions) before it answers.

    ``reset`` puts the tools' schemas in the system message (after the data's own system prompt
    when there is one); each ``step`` runs the reply's tool calls, one ``tool`` message each.
    Every call runs in a worker thread under ``timeout_s``: a call past it returns an error to the
    policy and the episode goes on (Python cannot stop the thread; it finishes in the background).
    """

    def __init__(self, tools: list[Callable], timeout_s: float = 5.0):
        self.tools = {fn.__name__: fn for fn in tools}
        self.schemas = [tool_schema(fn) for fn in tools]
        self.timeout_s = timeout_s

    def system_prompt(self) -> str:
        shown = [{k: v for k, v in s["function"].items() if k != "return"} for s in self.schemas]
        return SYSTEM_TEMPLATE.format(tools="\n".join(json.dumps(s) for s in shown))

    def shortest_call(self) -> str:
        """A call of the first tool with a one-character value for each required argument: what the
        rollout's per-turn token limit must at least hold."""
        schema = self.schemas[0]["function"]
        arguments = dict.fromkeys(schema.get("parameters", {}).get("required", []), "1")
        return tool_call_text(schema["name"], arguments)

    def reset(self, task: Task) -> Messages:
        messages = list(task.messages)
        if messages and messages[0]["role"] == "system":
            head = {"role": "system", "content": f"{messages[0]['content']}\n\n{self.system_prompt()}"}
            return [head, *messages[1:]]
        return [{"role": "system", "content": self.system_prompt()}, *messages]

    def step(self, reply: str) -> Step:
        calls = tool_calls(reply)
        if not calls:
            return Step(done=True)
        results = [self.call(body) for body in calls]
        return Step(
            messages=[{"role": "tool", "content": text} for text, _ in results],
            done=False,
            tool_calls=len(calls),
            tool_errors=sum(not ok for _, ok in results),
        )

    def call(self, body: str) -> tuple[str, bool]:
        """(what the tool returned, or the error in words; whether the call worked)."""
        try:
            request = json.loads(body)
        except json.JSONDecodeError as err:
            return f"error: the tool call is not JSON ({err.msg})", False
        if not isinstance(request, dict) or not isinstance(request.get("name"), str):
            return 'error: a tool call is {"name": ..., "arguments": {...}}', False
        fn = self.tools.get(request["name"])
        if fn is None:
            return f"error: no tool named {request['name']!r}; tools: {sorted(self.tools)}", False
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            return "error: arguments must be an object of named values", False
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            result = pool.submit(fn, **arguments).result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            return f"error: {request['name']} took longer than {self.timeout_s:g} s", False
        except TypeError as err:  # wrong or missing arguments
            return f"error: {err}", False
        except Exception as err:  # the tool's own failure: the policy reads it
            return f"error: {type(err).__name__}: {err}", False
        finally:
            pool.shutdown(wait=False)
        return str(result), True
