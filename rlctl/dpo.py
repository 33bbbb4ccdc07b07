"""`rlctl dpo`: direct preference optimisation on preference pairs, the offline alternative to RL.

For N pairs (x, y_c, y_r) of a step (over all ranks), with sequence log-probs log π(y|x) summed over
the reply's tokens (its end-of-turn token included):

    h_i = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))
    L   = (1/N) Σ_i ℓ(h_i)         ℓ: sigmoid DPO, conservative DPO or IPO (``algos.preference``)

The reference is the policy's initial weights. Its log-probs are computed once per pair, before the
first update, and kept in the run folder, so no second model is held in memory and a resumed run
uses the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.markup import escape

from rlctl import models
from rlctl.algos.preference import DPO_LOSSES, dpo_loss
from rlctl.checkpoint import CheckpointPolicy
from rlctl.config import fill
from rlctl.data import PromptSampler
from rlctl.data.demonstrations import encode_demonstration
from rlctl.data.preferences import PreferencePair, PreferenceSpec, load_pairs
from rlctl.data.prompts import PromptFormat
from rlctl.data.sources import Example, SourceSpec, arithmetic
from rlctl.distributed import Ranks, launched_ranks, sum_over_ranks
from rlctl.errors import RlctlError, check_fields
from rlctl.evaluate import HeldOutRewardFailed
from rlctl.offline import (
    OfflineRun,
    OfflineSettings,
    load_policy,
    open_run_folder,
    read_engine_settings,
    say_when_nothing_is_held_out,
    start_training,
)
from rlctl.optim.scoring import pad_rows, target_logprobs
from rlctl.rewards.rules import Term, WeightedRewards
from rlctl.sft import SFTEvalSpec, task_evaluator

REFERENCE_FILE = "reference_logprobs.pt"  # in the run folder: log π_ref of every pair's two replies


@dataclass(frozen=True)
class DPOSpec:
    beta: float
    loss_type: str
    label_smoothing: float
    nll_coef: float
    ipo_length_normalised: bool = False

    def __post_init__(self) -> None:
        checks = (("beta", self.beta > 0, "must be > 0"),
                  ("loss_type", self.loss_type in DPO_LOSSES, f"must be one of {DPO_LOSSES.names()}"),
                  ("label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
                  ("label_smoothing", self.loss_type == "sigmoid" or self.label_smoothing == 0,
                   "applies to loss_type=sigmoid only; leave it at 0 for ipo"),
                  ("ipo_length_normalised", self.loss_type == "ipo" or not self.ipo_length_normalised,
                   "applies to loss_type=ipo only; leave it false for sigmoid"),
                  ("nll_coef", self.nll_coef >= 0, "must be >= 0"))  # fmt: skip
        check_fields(self, checks)


@dataclass(frozen=True)
class EncodedReplies:
    """Both replies of each pair as token ids with the mask of the reply's tokens, and the
    reference's sequence log-probs of each (filled once the policy is loaded)."""

    pairs: list[PreferencePair]
    chosen: list[tuple[list[int], list[int]]]
    rejected: list[tuple[list[int], list[int]]]
    skipped: int

    def __len__(self) -> int:
        return len(self.pairs)


def encode_replies(pairs: list[PreferencePair], tokenizer, max_tokens: int) -> EncodedReplies:
    kept, chosen, rejected, skipped = [], [], [], 0
    for pair in pairs:
        sides = [encode_demonstration(tokenizer, pair.prompt + reply, pair.origin, first_trained=len(pair.prompt))
                 for reply in (pair.chosen, pair.rejected)]  # fmt: skip
        if max(len(ids) for ids, _ in sides) > max_tokens:
            skipped += 1
            continue
        kept.append(pair)
        chosen.append(sides[0])
        rejected.append(sides[1])
    return EncodedReplies(kept, chosen, rejected, skipped)


@dataclass(frozen=True)
class PairRows:
    """B pairs: the rows of both replies and the reference log-probs [B] of each."""

    chosen: list[tuple[list[int], list[int]]]
    rejected: list[tuple[list[int], list[int]]]
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.chosen)

    @property
    def stat_weight(self) -> float:
        return float(self.size)

    def rows(self, index: torch.Tensor) -> PairRows:
        picked = index.tolist()
        return PairRows([self.chosen[i] for i in picked], [self.rejected[i] for i in picked],
                        self.ref_chosen[index], self.ref_rejected[index])  # fmt: skip


def reply_logprobs(
    model, sides: list[tuple[list[int], list[int]]], pad_id: int, autocast
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) = Σ_t over the reply's tokens of log π(y_t | x, y_<t), one forward pass, and the
    reply's token count. -> ([B], [B])."""
    input_ids, attention, positions, loss_mask = pad_rows([s[0] for s in sides], [s[1] for s in sides], pad_id)
    device = next(model.parameters()).device
    with autocast():
        logp, mask = target_logprobs(model, input_ids.to(device), attention.to(device), positions.to(device),
                                     loss_mask.to(device))  # fmt: skip
    return (logp * mask).sum(dim=1).cpu(), mask.sum(dim=1).cpu()


@torch.no_grad()
def reference_logprobs(
    model, replies: EncodedReplies, pad_id: int, batch_size: int, autocast
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref of every pair's chosen and rejected reply, [N] each, ``batch_size`` pairs at a time."""
    chosen, rejected = [], []
    for start in range(0, len(replies), batch_size):
        rows = slice(start, start + batch_size)
        both, _ = reply_logprobs(model, replies.chosen[rows] + replies.rejected[rows], pad_id, autocast)
        n = len(replies.chosen[rows])
        chosen.append(both[:n])
        rejected.append(both[n:])
    empty = torch.zeros(0)
    return (torch.cat(chosen) if chosen else empty), (torch.cat(rejected) if rejected else empty)


@dataclass
class PreferenceObjective:
    """DPO's loss on pairs; evaluated by held-out preference accuracy and, for task pairs, accuracy."""

    model_name: str
    train: EncodedReplies
    held_out: EncodedReplies
    reference: dict[str, torch.Tensor]  # train_chosen, train_rejected, held_out_chosen, held_out_rejected: [N]
    spec: DPOSpec
    pad_id: int
    eval_batch_size: int
    autocast: object
    evaluator: object  # task accuracy, or None

    def describe(self) -> str:
        return (f"dpo: {self.model_name}, {len(self.train)} training pairs, {len(self.held_out)} held-out; "
                f"loss {self.spec.loss_type}, β {self.spec.beta:g}"
                + (f", label smoothing {self.spec.label_smoothing:g}" if self.spec.label_smoothing else "")
                + (", log-ratios per token" if self.spec.ipo_length_normalised else "")
                + (f", chosen NLL × {self.spec.nll_coef:g}" if self.spec.nll_coef else ""))  # fmt: skip

    def batch(self, index: list[int]) -> PairRows:
        picked = torch.tensor(index, dtype=torch.long)
        return PairRows([self.train.chosen[i] for i in index], [self.train.rejected[i] for i in index],
                        self.reference["train_chosen"][picked], self.reference["train_rejected"][picked])  # fmt: skip

    def loss_fn(self, engine, batch: PairRows):
        (total_pairs,) = sum_over_ranks([float(batch.size)])

        def loss_fn(micro: PairRows):
            both, tokens = reply_logprobs(engine.model, micro.chosen + micro.rejected, self.pad_id, self.autocast)
            chosen, rejected = both[: micro.size], both[micro.size :]
            loss, stats = dpo_loss(chosen, rejected, micro.ref_chosen, micro.ref_rejected, self.spec.beta,
                                   self.spec.loss_type, self.spec.label_smoothing, self.spec.nll_coef,
                                   tokens[: micro.size], self.spec.ipo_length_normalised,
                                   tokens[micro.size :])  # fmt: skip
            loss = loss / total_pairs  # this micro-batch's share of the step's mean
            return loss, {"loss/dpo": loss.detach(), **stats, "dpo/logp_chosen": chosen.detach().mean(),
                          "dpo/logp_rejected": rejected.detach().mean()}  # fmt: skip

        return loss_fn

    @torch.no_grad()
    def evaluate(self, engine) -> tuple[dict[str, float], str]:
        results: dict[str, float] = {}
        line = ""
        if len(self.held_out):
            chosen, rejected = reference_logprobs(engine.model, self.held_out, self.pad_id, self.eval_batch_size,
                                                  self.autocast)  # fmt: skip
            _, stats = dpo_loss(chosen, rejected, self.reference["held_out_chosen"],
                                self.reference["held_out_rejected"], self.spec.beta)  # fmt: skip
            results = {"preference_accuracy": float(stats["dpo/accuracy"]),
                       "reward_margin": float(stats["dpo/reward_margin"]), "n_pairs": len(self.held_out)}  # fmt: skip
            line = (f"preference accuracy {results['preference_accuracy']:.3f}  reward margin "
                    f"{results['reward_margin']:.3f} ({len(self.held_out)} held-out pairs)")  # fmt: skip
        if self.evaluator is not None:
            try:
                task = self.evaluator(engine)
            except HeldOutRewardFailed as err:
                return {**results, "error": str(err)}, line + f"  no accuracy: {escape(str(err))}"
            results.update(task)
            line += f"  accuracy {task['accuracy']:.3f} ({task['n_prompts']} held-out prompts)"
        return results, line


@dataclass(frozen=True)
class DPOEvalSpec(SFTEvalSpec):
    task_accuracy: bool  # built-in pairs: also greedy accuracy on the held-out problems


def read_dpo_settings(cfg: DictConfig, ranks: Ranks):
    """Every value of the ``dpo`` config checked, one-line errors naming the key; nothing loaded."""
    eval_spec = fill("eval", cfg.eval, DPOEvalSpec)
    settings = OfflineSettings(per_step=cfg.pairs_per_step, epochs=cfg.epochs, steps=cfg.steps,
                               eval_enabled=eval_spec.enabled, eval_every=eval_spec.every)  # fmt: skip
    try:
        spec = DPOSpec(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                       nll_coef=cfg.nll_coef, ipo_length_normalised=cfg.ipo_length_normalised)  # fmt: skip
    except ValueError as err:
        raise RlctlError(str(err)) from None
    optim, zero, micro = read_engine_settings(cfg, "dpo", "pairs_per_step", ranks)
    data = fill("data", cfg.data, PreferenceSpec)
    models.check_path(cfg.model.path, "model.path")
    return settings, eval_spec, spec, data, optim, zero, micro


def _held_out_problems(data: PreferenceSpec) -> list[Example]:
    """The held-out problems behind the built-in pairs, asked as ``rlctl train`` asks them."""
    problems = SourceSpec(digits=data.digits, num_operands=data.num_operands, operators=data.operators,
                          eval_fraction=data.eval_fraction, seed=data.seed)  # fmt: skip
    return arithmetic(problems)[1][: data.eval_size]


def build_dpo(cfg: DictConfig, run_dir: Path, resume_command: str) -> OfflineRun:
    """Config -> the DPO run: every check, the pairs, the policy, then the reference log-probs."""
    from rlctl.build import prepare_process

    ranks = launched_ranks()
    settings, eval_spec, spec, data, optim, zero, micro = read_dpo_settings(cfg, ranks)
    prepare_process(cfg.engine)
    train_pairs, held_out_pairs = load_pairs(data)  # data errors come before any model loads
    resume_from, config = open_run_folder(cfg, run_dir, ranks)
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    train, held_out = (encode_replies(p, tokenizer, data.max_tokens) for p in (train_pairs, held_out_pairs))
    if len(train) == 0:
        raise RlctlError(f"data: every training pair has a side longer than data.max_tokens={data.max_tokens}")
    steps = settings.total_steps(len(train), ranks.world_size)
    engine, logger = start_training(cfg, load_policy(cfg, tokenizer, resume_from), optim, zero, ranks, steps, run_dir)
    reference_file = run_dir / REFERENCE_FILE
    if resume_from is not None:
        reference = torch.load(reference_file, weights_only=True)
    else:  # the initial policy is the reference: score every pair once, before any update
        engine.model.eval()
        reference = {}
        for name, part in (("train", train), ("held_out", held_out)):
            chosen, rejected = reference_logprobs(engine.model, part, tokenizer.pad_token_id, eval_spec.batch_size,
                                                  engine.autocast)  # fmt: skip
            reference[f"{name}_chosen"], reference[f"{name}_rejected"] = chosen, rejected
        engine.model.train()
        if ranks.is_main:
            torch.save(reference, reference_file)
        logger.message(f"reference log-probs of {len(train) + len(held_out)} pairs saved to {reference_file}")
    for name, part in (("training", train), ("held-out", held_out)):
        if part.skipped:
            logger.message(f"[yellow]data: {part.skipped} {name} pairs skipped (a side longer than "
                           f"data.max_tokens={data.max_tokens})")  # fmt: skip
    task_accuracy = eval_spec.task_accuracy and data.source == "arithmetic"  # evaluates held-out problems, not pairs
    say_when_nothing_is_held_out(
        logger, "pairs", len(train), len(held_out), settings.eval_enabled and not task_accuracy
    )
    evaluator = None
    if task_accuracy:
        exact_number = WeightedRewards([Term("exact_number", 1.0, {})])  # how `rlctl train` judges the task
        evaluator = task_evaluator(exact_number, _held_out_problems(data),
                                   PromptFormat(system_prompt=data.system_prompt), tokenizer, eval_spec,
                                   engine.autocast)  # fmt: skip
    objective = PreferenceObjective(type(engine.unwrapped()).__name__, train, held_out, reference, spec,
                                    tokenizer.pad_token_id, eval_spec.batch_size, engine.autocast, evaluator)  # fmt: skip
    return OfflineRun(
        name="dpo", objective=objective, tokenizer=tokenizer, engine=engine,
        sampler=PromptSampler(len(train), settings.per_step * ranks.world_size, data.seed),
        settings=settings, micro_batch_size=micro, logger=logger,
        checkpoints=fill("checkpoint", cfg.checkpoint, CheckpointPolicy), run_dir=run_dir, steps=steps,
        save_final=cfg.save_final, ranks=ranks, resume_from=resume_from, resume_command=resume_command, config=config,
    )  # fmt: skip
