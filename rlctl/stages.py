"""What the RL loop runs on: the stages ``build`` makes once from the config, as plain values.
Below both the loop (``trainer``) and the stages' helpers (``sampling``), which read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlctl.algos import Algorithm
from rlctl.algos.correction import MismatchCorrection
from rlctl.checkpoint import CheckpointPolicy
from rlctl.data import PromptSampler, PromptSet
from rlctl.distributed import Ranks
from rlctl.evaluate import Evaluator
from rlctl.logging import Loggers
from rlctl.optim.engine import Engine
from rlctl.optim.layout import BatchLayout
from rlctl.optim.update import update
from rlctl.rewards import WeightedRewards
from rlctl.rollout import HFRollout, SamplingParams
from rlctl.rollout.multiturn import EnvironmentRollout
from rlctl.rollout.vllm import VLLMRollout


@dataclass
class Stages:
    """Everything the loop uses, built once by ``build`` from the config (plain values only)."""

    tokenizer: object
    policy: Engine
    critic: Engine | None  # exists iff the algorithm's advantage estimator needs values
    reference: torch.nn.Module | None  # frozen; None when the algorithm has no KL term
    # samples the policy: its own model (hf) or a vLLM engine's copy; turn by turn against an environment (env)
    rollout: HFRollout | VLLMRollout | EnvironmentRollout
    rewards: WeightedRewards
    algo: Algorithm
    layout: BatchLayout
    sampling: SamplingParams  # the rollout's settings (the temperature also applies when scoring)
    correction: MismatchCorrection  # what to do about the rollout engine's own log-probs (vllm)
    train_prompts: PromptSet
    sampler: PromptSampler
    evaluator: Evaluator | None
    logger: Loggers
    checkpoints: CheckpointPolicy
    run_dir: Path
    steps: int  # training steps
    save_final: bool  # write checkpoints/final at the end
    critic_warmup_steps: int = 0  # steps during which only the critic trains
    max_failed_reward_steps: int = 2  # stop when a reward term fails on every sample this many steps in a row
    eval_every: int = 0  # steps between evaluations (0 = before and after only)
    # evaluations since the best eval.gold, each with a higher trained reward, before the warning
    gold_patience: int = 2
    keep_best: str = "none"  # none | gold | reward: keep the best evaluated policy as checkpoints/best
    sample_every: int = 0  # steps between sample tables (0 = never)
    samples_shown: int = 3
    ranks: Ranks = Ranks()  # this process's place in a data-parallel launch
    resume_from: Path | None = None  # a checkpoint whose weights build already loaded
    resume_command: str = "rlctl train resume=RUN_DIR"  # printed when a run is stopped early
    env_description: str = ""  # multi-turn: the environment and its limits, in one line ("" for one turn)
    memory_plan: str = ""  # the printed plan (rlctl/plan.py), made before the models loaded
    config: dict = field(default_factory=dict)  # the run's settings as dotted keys, kept in checkpoints
    # how the policy learns from one minibatch: an optimiser update (update) or TRPO's trust-region step
    policy_update: Callable = update
