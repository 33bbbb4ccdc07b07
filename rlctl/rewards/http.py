"""A remote reward: one POST per batch to a reward server.

Request body:  ``{"prompts": [chat, ...], "completions": [str, ...], "answers": [str, ...]}``, where
each chat is the list of messages the policy answered (``{"role", "content"}``, the system prompt
and prompt template applied).
Reply body:    ``{"scores": [score, ...]}``, one per completion: a number, or step rewards as a list
of ``[char_offset, reward]`` pairs.

A request that cannot connect, times out or gets a 429/5xx is tried again (``retries`` more
times, waiting 0.5 s, 1 s, 2 s, ...); a reply that is not the right shape is not. What still fails
raises :class:`RewardServerError`, which the reward stage turns into fallback scores (or a stop).
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from rlctl.errors import RlctlError, check_fields


@dataclass(frozen=True)
class HttpRewardSpec:
    """The reward server keys of the ``reward`` group, filled by field name."""

    url: str | None  # http(s)://host:port/path
    headers: dict[str, str] = field(default_factory=dict)  # header name -> environment variable with its value
    retries: int = 2  # further tries after a connection error, a timeout or a 429/5xx
    timeout_s: float = 10.0  # per request (0 = no limit)

    def __post_init__(self) -> None:
        check_fields(self, (("retries", self.retries >= 0, "must be ≥ 0"),
                            ("timeout_s", self.timeout_s >= 0, "must be ≥ 0 (0 = no limit)")))  # fmt: skip


class RewardServerError(Exception):
    """The server could not give this batch its scores."""


def _retryable(err: Exception) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code == 429 or err.code >= 500
    return isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError))


def _check_score(value, index: int):
    if isinstance(value, bool) or value is None:
        raise RewardServerError(f"score {index} is {value!r}, not a number or a list of [char_offset, reward] pairs")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise RewardServerError(f"score {index} is {value!r}, not a finite number")
        return float(value)
    if isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)
        for p in value
    ):
        return [(int(offset), float(reward)) for offset, reward in value]
    raise RewardServerError(f"score {index} is {value!r}, not a number or a list of [char_offset, reward] pairs")


class HttpReward:
    """The ``http`` term: the scores a reward server gives a batch."""

    time_limited = False  # it keeps its own time limit per request, and retries

    def __init__(self, spec: HttpRewardSpec):
        if not spec.url:
            raise RlctlError(
                "reward.url: the http term needs the reward server's URL (reward.url=http://HOST:PORT/PATH)"
            )
        if not spec.url.startswith(("http://", "https://")):
            raise RlctlError(f"reward.url: must start with http:// or https://, got {spec.url!r}")
        self.spec = spec
        self.headers = {"Content-Type": "application/json"}
        for name, variable in spec.headers.items():
            if variable not in os.environ:
                raise RlctlError(
                    f"reward.headers.{name}: the environment variable {variable} is not set (headers name the "
                    "variable that holds the value, so secrets stay out of config.yaml)"
                )
            self.headers[name] = os.environ[variable]

    def _post(self, body: bytes) -> dict:
        request = urllib.request.Request(self.spec.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.spec.timeout_s or None) as reply:
            return json.loads(reply.read().decode("utf-8"))

    def __call__(self, prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list:
        body = json.dumps({"prompts": prompts, "completions": completions, "answers": answers}).encode("utf-8")
        tries = 1 + self.spec.retries
        for attempt in range(tries):
            try:
                reply = self._post(body)
                break
            except json.JSONDecodeError as err:
                raise RewardServerError(
                    f"{self.spec.url} replied with something that is not JSON ({err.msg})"
                ) from None
            except Exception as err:  # noqa: BLE001 (urllib raises many kinds; the retryable ones are picked)
                if not _retryable(err) or attempt == tries - 1:
                    reason = err.reason if isinstance(err, urllib.error.URLError) else err
                    raise RewardServerError(
                        f"{self.spec.url}: {type(err).__name__}: {reason} (after {attempt + 1} of {tries} tries)"
                    ) from None
                time.sleep(min(0.5 * 2**attempt, 8.0))
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list):
            raise RewardServerError(f"{self.spec.url} replied without a list 'scores': {str(reply)[:120]}")
        if len(scores) != len(completions):
            raise RewardServerError(
                f"{self.spec.url} replied with {len(scores)} scores for {len(completions)} completions"
            )
        return [_check_score(value, i) for i, value in enumerate(scores)]
