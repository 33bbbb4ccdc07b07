"""The multi-turn rollout: the policy and an environment take turns, token in, token out.

A trajectory is one token sequence: the prompt (the environment's first messages through the chat
template), then for each turn the exact token ids the backend sampled, then the observation's
tokens. The policy's tokens are never decoded and encoded again: the text of a reply is only what
the environment reads. An observation's tokens are what the chat template writes for it: the
conversation rendered with the observation (and the next assistant header) minus the conversation
rendered without it, starting after the end-of-turn token the policy sampled. A template whose
rendering of a conversation is not a prefix of its rendering of the continuation is refused.

In the batch, the whole trajectory after the prompt is the response: ``attention_mask`` is 1 on
every token of it, ``response_mask`` (what is trained: policy loss, KL, entropy, value loss) only
on the sampled tokens; ``rollout_logprobs`` exist on sampled tokens only (0 elsewhere). All
trajectories of a rollout advance together: one backend call per turn for every live trajectory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlctl.batch import Batch
from rlctl.data.prompts import render_messages, uses_chat_template
from rlctl.distributed import any_rank
from rlctl.envs.base import EnvSpec, Messages, Step, Task, checked_messages, checked_step
from rlctl.errors import RlctlError
from rlctl.rollout.hf import SamplingParams, left_pad

# Per-trajectory counts the batch carries as ``env_stats`` (logged per step as env/<name>, means).
STATS = ("turns", "tool_calls", "tool_errors", "observation_tokens", "observations_cut", "truncated",
         "step_errors", "drift")  # fmt: skip


@dataclass
class Trajectory:
    """One episode being played: the conversation so far and its tokens after the prompt."""

    env: object
    messages: Messages  # every message so far: the environment's first ones, replies, observations
    prompt_ids: list[int]
    response: list[int] = field(default_factory=list)  # sampled and observation tokens, in order
    trained: list[float] = field(default_factory=list)  # 1 on sampled tokens, 0 on observation tokens
    logprobs: list[float] = field(default_factory=list)  # the rollout engine's, 0 on observation tokens
    rewards: list[float] = field(default_factory=list)  # the environment's per-turn rewards on each turn's last token
    last_reply: str = ""
    live: bool = True
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATS, 0.0))
    error: str = ""  # the first exception an environment raised, in words


class EnvironmentRollout:
    """A rollout backend (``HFRollout`` or ``VLLMRollout``) driven turn by turn against an environment
    made by ``make_env`` for every trajectory. Same interface as the backends."""

    def __init__(self, backend, tokenizer, make_env: Callable[[], object], spec: EnvSpec, chat_template: bool = True):
        self.backend, self.tokenizer, self.make_env, self.spec = backend, tokenizer, make_env, spec
        self.chat_template = uses_chat_template(chat_template, tokenizer)
        self.eos_ids = backend.eos_ids

    @property
    def params(self) -> SamplingParams:
        return self.backend.params

    def with_params(self, params: SamplingParams) -> EnvironmentRollout:
        return EnvironmentRollout(self.backend.with_params(params), self.tokenizer, self.make_env, self.spec,
                                  self.chat_template)  # fmt: skip

    def load_weights_of(self, policy) -> None:
        self.backend.load_weights_of(policy)

    @property
    def max_response_tokens(self) -> int:
        """The longest trajectory after its prompt that the limits allow."""
        return self.spec.total_tokens(self.params.max_new_tokens)

    @torch.no_grad()
    def generate(
        self,
        policy,
        prompt_ids: list[list[int]],
        answers: list[str],
        group_size: int,
        prompt_texts: list[str] | None = None,
        conversations: list[Messages] | None = None,
    ) -> Batch:
        """Play ``group_size`` episodes from each prompt's conversation; rows p·G … p·G+G−1 belong to
        prompt p. ``prompt_ids`` and ``prompt_texts`` are unused: each environment's ``reset`` gives
        its first messages, and the batch shows their first user message."""
        if conversations is None:
            raise ValueError("a multi-turn rollout starts from the prompts' conversations")
        trajectories = [
            self._start(Task(conversation, answer))
            for conversation, answer in zip(conversations, answers)
            for _ in range(group_size)
        ]
        budget = self.max_response_tokens
        for turn in range(self.spec.max_turns):
            live = [t for t in trajectories if t.live]
            # Ranks take turns together (under ZeRO-3 each turn gathers the weights, a collective): a
            # rank whose episodes have all ended samples nothing while the others go on.
            if not any_rank(bool(live)):
                break
            room = [min(self.params.max_new_tokens, budget - len(t.response)) for t in live]
            sampled = self.backend.complete(policy, [t.prompt_ids + t.response for t in live], max(room, default=1))
            for t, limit, sample in zip(live, room, sampled):
                self._play(t, sample.token_ids[:limit], sample.logprobs, last_turn=turn == self.spec.max_turns - 1,
                           budget=budget)  # fmt: skip
        return self._batch(trajectories, answers, group_size)

    def _start(self, task: Task) -> Trajectory:
        env = self.make_env()
        where = f"env: {type(env).__name__}.reset"
        try:
            first = env.reset(task)
        except Exception as err:  # the user's environment may raise anything
            raise RlctlError(f"{where} raised {type(err).__name__}: {err}") from None
        messages = checked_messages(first, where)
        text, has_special = render_messages(messages, self.chat_template, self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=not has_special)["input_ids"]
        return Trajectory(env, messages, ids)

    def _play(self, t: Trajectory, ids: list[int], logprobs: list[float] | None, last_turn: bool, budget: int) -> None:
        """Append one reply's sampled tokens; ask the environment; append its observation or end."""
        t.response += ids
        t.trained += [1.0] * len(ids)
        t.logprobs += (logprobs or [0.0] * len(ids))[: len(ids)]
        t.rewards += [0.0] * len(ids)
        t.stats["turns"] += 1
        ended = bool(ids) and ids[-1] in self.eos_ids
        t.last_reply = self.tokenizer.decode(ids, skip_special_tokens=True)
        t.messages.append({"role": "assistant", "content": t.last_reply})
        if not ended:  # cut by the per-turn or total token limit: the reply is unfinished
            t.live, t.stats["truncated"] = False, 1.0
            return
        step = self._step(t)
        if step is None:
            return
        if step.reward and t.rewards:
            t.rewards[-1] += step.reward
        t.stats["tool_calls"] += step.tool_calls
        t.stats["tool_errors"] += step.tool_errors
        if step.done:
            t.live = False
            return
        if last_turn:  # the environment wants another reply and there are no turns left
            t.live, t.stats["truncated"] = False, 1.0
            return
        observation, cut = self.observation_ids(t.messages, step.messages, ids[-1])
        t.messages += step.messages
        t.stats["observations_cut"] += cut
        room = budget - len(t.response)
        if len(observation) > room:
            observation, t.stats["truncated"], t.live = observation[:room], 1.0, False
        t.response += observation
        t.trained += [0.0] * len(observation)
        t.logprobs += [0.0] * len(observation)
        t.rewards += [0.0] * len(observation)
        t.stats["observation_tokens"] += len(observation)
        if len(t.response) >= budget:
            t.live, t.stats["truncated"] = False, 1.0

    def _step(self, t: Trajectory) -> Step | None:
        where = f"env: {type(t.env).__name__}.step"
        try:
            return checked_step(t.env.step(t.last_reply), where)
        except RlctlError:
            raise  # the environment's answer has the wrong shape: a bug to fix, not a trajectory to skip
        except Exception as err:  # the environment failed on this reply: the episode ends, flagged and counted
            t.error = t.error or f"{where} raised {type(err).__name__}: {err}"
            t.live, t.stats["step_errors"], t.stats["truncated"] = False, 1.0, 1.0
            return None

    def observation_ids(self, before: Messages, observation: Messages, ended_with: int) -> tuple[list[int], bool]:
        """The tokens between the policy's end-of-turn token and its next reply, as the chat template
        writes them (the observation's messages, then the next assistant header), and whether they
        were cut to ``env.max_observation_tokens`` (keeping the beginning and the header). ``before``
        ends with the reply just sampled, whose last token is ``ended_with``."""
        body, header = self._observation_text(before, observation, ended_with)
        ids = self.tokenizer(body + header, add_special_tokens=False)["input_ids"]
        limit = self.spec.max_observation_tokens
        if len(ids) <= limit:
            return ids, False
        header_ids = self.tokenizer(header, add_special_tokens=False)["input_ids"]
        body_ids = self.tokenizer(body, add_special_tokens=False)["input_ids"]
        return body_ids[: max(limit - len(header_ids), 0)] + header_ids, True

    def _observation_text(self, before: Messages, observation: Messages, ended_with: int) -> tuple[str, str]:
        """(the observation's text after the end-of-turn token, the next assistant header)."""
        if not self.chat_template:
            return "\n" + "".join(f"{m['role']}: {m['content']}\n" for m in observation), "assistant:"
        template = self.tokenizer.apply_chat_template
        base = template(before, tokenize=False)
        without_header = template(before + observation, tokenize=False)
        full = template(before + observation, tokenize=False, add_generation_prompt=True)
        if not (without_header.startswith(base) and full.startswith(without_header)):
            raise RlctlError(
                "env: this tokenizer's chat template does not render a conversation as the prefix of its continuation, "
                "so an observation's tokens cannot be appended to the sampled ones; use data.chat_template=false"
            )
        end_of_turn = self.tokenizer.decode([ended_with])
        cut = base.rfind(end_of_turn)
        if not end_of_turn or cut < 0:
            raise RlctlError(f"env: the chat template does not end an assistant turn with {end_of_turn!r}, the token "
                             "the policy stops at, so the observation cannot follow it")  # fmt: skip
        return base[cut + len(end_of_turn) :] + without_header[len(base) :], full[len(without_header) :]

    def drifts(self, t: Trajectory) -> bool:
        """Whether the trajectory's text, tokenised again, differs from its tokens (a diagnostic:
        training always uses the sampled tokens)."""
        text = self.tokenizer.decode(t.response, skip_special_tokens=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] != t.response

    def _batch(self, trajectories: list[Trajectory], answers: list[str], group_size: int) -> Batch:
        pad = self.tokenizer.pad_token_id
        prompt, prompt_mask = left_pad([t.prompt_ids for t in trajectories], pad)
        width = max(1, max(len(t.response) for t in trajectories))
        rows = len(trajectories)
        responses = torch.full((rows, width), pad, dtype=torch.long)
        attended, trained = torch.zeros((rows, width), dtype=torch.long), torch.zeros((rows, width))
        logprobs, rewards = torch.zeros((rows, width)), torch.zeros((rows, width))
        for i, t in enumerate(trajectories):
            n = len(t.response)
            t.stats["drift"] = float(self.drifts(t))
            responses[i, :n] = torch.tensor(t.response, dtype=torch.long)
            attended[i, :n] = 1
            trained[i, :n] = torch.tensor(t.trained)
            logprobs[i, :n] = torch.tensor(t.logprobs)
            rewards[i, :n] = torch.tensor(t.rewards)
        stats = {k: torch.tensor([t.stats[k] for t in trajectories]) for k in STATS}
        if self.spec.mask_truncated:
            trained = trained * (1 - stats["truncated"])[:, None]
        with_logprobs = self.params.temperature > 0 and self.backend.gives_logprobs
        return Batch(
            input_ids=torch.cat([prompt, responses], dim=1),
            attention_mask=torch.cat([prompt_mask, attended], dim=1),
            response_mask=trained,
            group_ids=torch.arange(rows // group_size).repeat_interleave(group_size),
            # what sample tables show: the question the environment asked, not the data's prompt it started from
            prompts=[next((m["content"] for m in t.messages if m["role"] == "user"), "") for t in trajectories],
            completions=[t.last_reply for t in trajectories],
            answers=[a for a in answers for _ in range(group_size)],
            rollout_logprobs=logprobs if with_logprobs else None,
            turn_rewards=rewards if bool(rewards.any()) else None,
            conversations=[t.messages for t in trajectories],
            env_stats=stats,
            env_errors=[t.error for t in trajectories],
        )
