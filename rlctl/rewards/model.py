"""A learned reward: a sequence-classification model (one label) scores each prompt + completion.

The text is rendered with the reward model's own tokenizer and chat template (a reward model is
trained on its own format, and its vocabulary need not be the policy's), scored in batches without
gradients, and optionally normalised by running moments and clipped.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlctl import models
from rlctl.distributed import sum_over_ranks
from rlctl.errors import RlctlError, check_fields


@dataclass(frozen=True)
class ModelRewardSpec:
    """The reward model keys of the ``reward`` group, filled by field name."""

    model_path: str | list | None  # hub id, folder, or an `rlctl rm` run (its checkpoints/final); a list: an ensemble
    model_batch_size: int  # sequences per forward pass
    model_max_tokens: int  # longer texts keep their last tokens (where the answer is)
    normalize: bool  # subtract the running mean, divide by the running std
    clip: float  # clamp to [-clip, clip] after normalising (0 = off)
    ensemble_penalty: float = 0.0  # score = mean − penalty × std over the members

    def __post_init__(self) -> None:
        if self.model_path is not None and not isinstance(self.model_path, str):
            object.__setattr__(self, "model_path", [str(p) for p in self.model_path])
        checks = (("model_batch_size", self.model_batch_size >= 1, "must be ≥ 1"),
                  ("model_max_tokens", self.model_max_tokens >= 8, "must be ≥ 8"),
                  ("clip", self.clip >= 0 and math.isfinite(self.clip), "must be ≥ 0 (0 = off)"),
                  ("model_path", self.model_path is None or len(self.paths) > 0, "must name at least one reward model"),
                  ("ensemble_penalty", self.ensemble_penalty >= 0 and math.isfinite(self.ensemble_penalty),
                   "must be ≥ 0 (0 = the members' mean)"))  # fmt: skip
        check_fields(self, checks)

    @property
    def paths(self) -> list[str]:
        """The members: one path, or the ensemble's."""
        if self.model_path is None:
            return []
        return [self.model_path] if isinstance(self.model_path, str) else list(self.model_path)

    def key_of(self, index: int) -> str:
        """The config key that names member ``index`` (for errors)."""
        return "reward.model_path" if isinstance(self.model_path, str) else f"reward.model_path[{index}]"


class RunningMoments:
    """Mean and variance of every score seen so far (over all ranks), merged batch by batch
    (Chan et al.'s parallel update), so every rank normalises with the same numbers."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0  # m2 = Σ (x − mean)²

    def update(self, scores: torch.Tensor) -> None:
        n, total, squares = sum_over_ranks([float(scores.numel()), float(scores.sum()), float((scores**2).sum())])
        if n == 0:
            return
        batch_mean = total / n
        batch_m2 = max(squares - n * batch_mean**2, 0.0)
        delta, count = batch_mean - self.mean, self.count + n
        self.mean += delta * n / count
        self.m2 += batch_m2 + delta**2 * self.count * n / count
        self.count = count

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def not_a_reward_model(key: str, path: str, architectures: list[str] | None, missing: str) -> RlctlError:
    return RlctlError(
        f"{key}: {path!r} is not a reward model ({', '.join(architectures or ['unknown'])}; its weights lack "
        f"{missing!r}, so its score head would be random); train one with `rlctl rm` or give a sequence-classification "
        "checkpoint such as Skywork/Skywork-Reward-V2-Qwen3-0.6B"
    )


def several_labels(key: str, path: str, labels: int) -> RlctlError:
    return RlctlError(
        f"{key}: {path!r} is a classifier with {labels} labels; a reward model has one (a scalar score per sequence)"
    )


def check_reward_model_config(path: str, key: str = "reward.model_path") -> None:
    """The checks of :func:`load_reward_model` that read only ``config.json`` (the dry run's): a
    local folder (or run) must hold a sequence classifier with one label. Hub ids are checked on load."""
    import json

    folder = Path(models.resolve(path, key))
    if not (folder / "config.json").is_file():
        return
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise not_a_reward_model(key, path, architectures, "score.weight")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise several_labels(key, path, labels)


def load_reward_model(
    path: str, dtype: str = "float32", trust_remote_code: bool = False, key: str = "reward.model_path"
):
    """(model, tokenizer) of a reward model: ``AutoModelForSequenceClassification`` with one label
    and every weight present in the checkpoint. A causal LM (whose score head would be random) or a
    classifier with several labels is refused, naming ``key``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = models.resolve(path, key)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a missing head is reported below, in one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise RlctlError(f"{key}: cannot load a reward model from {path!r}: {models.first_line(err)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise not_a_reward_model(key, path, model.config.architectures, sorted(info["missing_keys"])[0])
    if model.config.num_labels != 1:
        raise several_labels(key, path, model.config.num_labels)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # the head reads the last token that is not padding
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return model, tokenizer


def encode_conversation(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation as the model reads it: through its chat template when it
    has one, else "role: content" lines ending in EOS; special tokens included exactly once."""
    if getattr(tokenizer, "chat_template", None):
        text, has_special = tokenizer.apply_chat_template(messages, tokenize=False), True
    else:
        lines = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        text, has_special = f"{lines}{tokenizer.eos_token or ''}", False
    return tokenizer(text, add_special_tokens=not has_special)["input_ids"]


def encode_texts(tokenizer, chats: list[list[dict]], completions: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each chat answered by its completion; longer ones keep their last ``max_tokens``."""
    return [
        encode_conversation(tokenizer, [*chat, {"role": "assistant", "content": completion}])[-max_tokens:]
        for chat, completion in zip(chats, completions)
    ]


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows -> (input_ids, attention_mask) [B, longest], padded on the right (positions stay 0..n-1)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """input_ids, attention_mask [B, L] -> the reward model's score of each sequence [B] (float32)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def ensemble_score(member_scores: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' scores [M, N] -> (mean − penalty · std over the members [N], that std [N]).
    The std is the population one (divided by M): 0 for one member, so a single model is its own score."""
    std = member_scores.std(dim=0, correction=0)
    return member_scores.mean(dim=0) - penalty * std, std


class ModelReward:
    """The ``reward_model`` term: ``score = RM(chat + completion)``, normalised and clipped if asked.
    With several reward models (an ensemble), ``score = mean_m RM_m − ensemble_penalty · std_m RM_m``
    (Coste et al. 2023: penalising the members' disagreement resists over-optimisation); each member
    reads the text with its own tokenizer, and their disagreement is logged as ``reward/ensemble_std``.

    Frozen; partitioned across ranks under ZeRO-3 like the reference model (every rank calls it
    the same number of times: its own samples, in equal chunks)."""

    time_limited = False  # a forward pass is not user code: no worker thread, no time limit

    def __init__(self, spec: ModelRewardSpec, dtype: str, trust_remote_code: bool, zero=None, autocast=None):
        from rlctl.optim.engine import frozen_for_inference

        if spec.model_path is None:
            raise RlctlError(
                "reward.model_path: the reward_model term needs a reward model (reward.model_path=PATH: a hub id, "
                "a folder, or an `rlctl rm` run)"
            )
        self.spec = spec
        self.members = []  # (frozen model, its tokenizer), one per reward model
        for index, path in enumerate(spec.paths):
            model, tokenizer = load_reward_model(path, dtype, trust_remote_code, spec.key_of(index))
            self.members.append((frozen_for_inference(model, zero), tokenizer))
        self.autocast = autocast or contextlib.nullcontext
        self.moments = RunningMoments()
        self.learning = True  # the moments follow the scores seen in training, not in evaluation
        self.last_stats: dict[str, torch.Tensor] = {}  # per-sample figures of the last call, logged as reward/<name>

    @torch.no_grad()
    def member_scores(self, chats: list[list[dict]], completions: list[str]) -> torch.Tensor:
        """Every member's scores [M, N], before combining and normalising."""
        rows = []
        for model, tokenizer in self.members:
            ids = encode_texts(tokenizer, chats, completions, self.spec.model_max_tokens)
            device = next(model.parameters()).device
            scores = []
            for start in range(0, len(ids), self.spec.model_batch_size):
                input_ids, mask = right_pad(ids[start : start + self.spec.model_batch_size], tokenizer.pad_token_id)
                with self.autocast():
                    scores.append(sequence_scores(model, input_ids.to(device), mask.to(device)).cpu())
            rows.append(torch.cat(scores) if scores else torch.zeros(0))
        return torch.stack(rows)

    def raw_scores(self, chats: list[list[dict]], completions: list[str]) -> torch.Tensor:
        """The term's scores [N] before normalising: the model's, or the ensemble's mean − penalty · std."""
        scores, std = ensemble_score(self.member_scores(chats, completions), self.spec.ensemble_penalty)
        self.last_stats = {"ensemble_std": std} if len(self.members) > 1 else {}
        return scores

    def __call__(self, prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[float]:
        scores = self.raw_scores(prompts, completions)
        if self.spec.normalize:
            if self.learning:
                self.moments.update(scores)
            scores = (scores - self.moments.mean) / (self.moments.std + 1e-6)
        if self.spec.clip > 0:
            scores = scores.clamp(-self.spec.clip, self.spec.clip)
        return scores.tolist()

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state["moments"])
