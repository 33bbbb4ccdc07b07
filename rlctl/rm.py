"""`rlctl rm`: a reward model learned from preference pairs (Bradley-Terry), or a judge (``head=judge``).

The model is ``AutoModelForSequenceClassification`` with one label, started from a causal LM
(``model.path``): its body, and a new scalar head reading the last token. A step is one optimiser
update on ``pairs_per_step`` pairs per process, with the engine, checkpoints, metrics and
evaluation of ``rlctl train``. The loss of a minibatch of N pairs (over all ranks) is

    L = (1/N) Σ_i −log σ(r(x_i, y_i^chosen) − r(x_i, y_i^rejected) − m_i)

with m_i the pair's margin (its row's ``margin`` plus ``margin`` of the config, 0 by default).
``center_rewards_coefficient`` c > 0 adds c·(1/N) Σ_i (r_c,i + r_r,i)², which keeps the scores near
zero (Bradley-Terry sees only their differences, so their level drifts otherwise).

``head=judge`` keeps the causal LM with its own head (whole, or under a LoRA adapter) and teaches it
to answer a question about one reply (``judge_form``, ``judge_template``): by default a higher
verdict margin z_Yes − z_No for the chosen reply than for the rejected one (``judge_loss=pairwise``),
or "Yes" for the chosen and "No" for the rejected (``yes_no``). Its
score of a reply is then σ(z_Yes − z_No), read by ``reward=judge``; a held-out pair counts as right
when the chosen reply's score is the higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlctl import models
from rlctl.algos.preference import JUDGE_LOSSES, JudgeLoss, bradley_terry_loss
from rlctl.checkpoint import CheckpointPolicy
from rlctl.config import fill
from rlctl.data import PromptSampler
from rlctl.data.preferences import EncodedPairs, PreferenceSpec, encode_pairs, load_pairs
from rlctl.distributed import Ranks, launched_ranks, sum_over_ranks
from rlctl.errors import RlctlError
from rlctl.offline import (
    OfflineRun,
    OfflineSettings,
    load_policy,
    open_run_folder,
    read_engine_settings,
    read_lora,
    say_when_nothing_is_held_out,
    start_training,
)
from rlctl.rewards.judge import (
    FORMS,
    PAIR_TEMPLATES,
    TRAINED_JUDGE_FILE,
    judge_ids,
    verdict_logits,
    verdict_token,
)
from rlctl.rewards.model import right_pad, sequence_scores

HEADS = ("scalar", "judge")


@dataclass(frozen=True)
class PairBatch:
    """B preference pairs: token ids of both sides and each pair's margin [B]."""

    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    margins: torch.Tensor  # [B] float

    @property
    def size(self) -> int:
        return len(self.chosen_ids)

    @property
    def stat_weight(self) -> float:
        """What a micro-batch's stats are weighted by when averaged: its pairs."""
        return float(self.size)

    def rows(self, index: torch.Tensor) -> PairBatch:
        picked = index.tolist()
        return PairBatch([self.chosen_ids[i] for i in picked], [self.rejected_ids[i] for i in picked],
                         self.margins[index])  # fmt: skip


def pair_batch(pairs: EncodedPairs, index: list[int], extra_margin: float) -> PairBatch:
    margins = torch.tensor([pairs.pairs[i].margin + extra_margin for i in index], dtype=torch.float32)
    return PairBatch([pairs.chosen_ids[i] for i in index], [pairs.rejected_ids[i] for i in index], margins)


def pair_scores(model, batch: PairBatch, pad_id: int, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) from one forward pass over both sides, right-padded."""
    input_ids, mask = right_pad(batch.chosen_ids + batch.rejected_ids, pad_id)
    device = next(model.parameters()).device
    with autocast():
        scores = sequence_scores(model, input_ids.to(device), mask.to(device)).cpu()
    return scores[: batch.size], scores[batch.size :]


@dataclass
class RewardModelObjective:
    """Bradley-Terry on preference pairs; evaluated by held-out pairwise accuracy."""

    model_name: str
    train_pairs: EncodedPairs
    held_out: EncodedPairs
    margin: float  # added to every pair's own margin
    eval_batch_size: int
    pad_id: int
    autocast: object
    center_coef: float = 0.0  # c of the centring term c·mean((r_c + r_r)²)

    def describe(self) -> str:
        return (f"reward model: {self.model_name} (one label), {len(self.train_pairs)} training pairs, "
                f"{len(self.held_out)} held-out")  # fmt: skip

    def batch(self, index: list[int]) -> PairBatch:
        return pair_batch(self.train_pairs, index, self.margin)

    def loss_fn(self, engine, batch: PairBatch):
        (total_pairs,) = sum_over_ranks([float(batch.size)])

        def loss_fn(micro: PairBatch):
            chosen, rejected = pair_scores(engine.model, micro, self.pad_id, self.autocast)
            centring = self.center_coef * ((chosen + rejected) ** 2).sum()
            # this micro-batch's share of the whole batch's loss
            loss = (bradley_terry_loss(chosen, rejected, micro.margins) + centring) / total_pairs
            gap = (chosen - rejected).detach()
            return loss, {"loss/rm": loss.detach(), "rm/centring": centring.detach() / total_pairs, "rm/accuracy": (gap > 0).float().mean(),
                          "rm/margin": gap.mean(), "rm/chosen": chosen.detach().mean(),
                          "rm/rejected": rejected.detach().mean()}  # fmt: skip

        return loss_fn

    @torch.no_grad()
    def evaluate(self, engine) -> tuple[dict[str, float], str]:
        """Pairwise accuracy (r_chosen > r_rejected) and the mean gap over the held-out pairs. Every
        rank scores all of them (the same forward passes: ZeRO-3 gathers collectively)."""
        gaps = []
        for start in range(0, len(self.held_out), self.eval_batch_size):
            index = list(range(start, min(start + self.eval_batch_size, len(self.held_out))))
            chosen, rejected = pair_scores(engine.model, pair_batch(self.held_out, index, 0.0), self.pad_id,
                                           self.autocast)  # fmt: skip
            gaps.append(chosen - rejected)
        return pairwise_results(torch.cat(gaps), self.held_out)


def pairwise_results(gap: torch.Tensor, held_out: EncodedPairs) -> tuple[dict[str, float], str]:
    """Held-out pairwise accuracy (score of chosen > score of rejected), overall and per kind of
    built-in pair, and the mean gap; gap [N] = score(chosen) − score(rejected)."""
    results = {"pairwise_accuracy": float((gap > 0).float().mean()), "margin_mean": float(gap.mean()),
               "n_pairs": len(held_out)}  # fmt: skip
    kinds = [pair.kind for pair in held_out.pairs]
    for kind in sorted(set(kinds) - {""}):  # built-in pairs: each kind of worse reply on its own
        picked = torch.tensor([k == kind for k in kinds])
        results[f"pairwise_accuracy/{kind}"] = float((gap[picked] > 0).float().mean())
    per_kind = "".join(f"  {key.split('/')[1]} {value:.3f}" for key, value in results.items() if "/" in key)
    line = (f"pairwise accuracy {results['pairwise_accuracy']:.3f}{per_kind}  margin {results['margin_mean']:.3f}  "
            f"({results['n_pairs']} held-out pairs)")  # fmt: skip
    return results, line


def reply_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def encode_judge_questions(pairs, tokenizer, form: str, template: str, max_tokens: int) -> EncodedPairs:
    """Each pair as two questions to the judge (``template`` about the chosen reply, then about the
    rejected one, in ``form``), as the judge reward asks them; a pair with a question longer than
    ``max_tokens`` is skipped."""

    def question(prompt: list[dict], reply: list[dict]) -> list[int]:
        return judge_ids(tokenizer, form, template, prompt, reply_text(reply))

    return encode_pairs(pairs, tokenizer, max_tokens, encode=question)


@dataclass
class JudgeObjective:
    """A causal LM taught to say "Yes" to the chosen reply more readily than to the rejected one
    (``loss``: pairwise or yes_no); evaluated by held-out pairwise accuracy of σ(z_Yes − z_No)."""

    model_name: str
    train_pairs: EncodedPairs  # the questions about each side, as judge prompts
    held_out: EncodedPairs
    form: str  # question | conversation
    template: str
    yes: int  # the verdict tokens
    no: int
    eval_batch_size: int
    pad_id: int
    autocast: object
    loss: JudgeLoss  # JUDGE_LOSSES[judge_loss]
    next_command: str = "rlctl train reward=judge reward.judge.model_path={final}"

    def describe(self) -> str:
        return (f"judge: {self.model_name} taught to answer Yes (chosen) / No (rejected), {len(self.train_pairs)} "
                f"training pairs, {len(self.held_out)} held-out")  # fmt: skip

    def batch(self, index: list[int]) -> PairBatch:
        return pair_batch(self.train_pairs, index, 0.0)

    def scores(self, model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits after the chosen questions [B, V], after the rejected [B, V], P(Yes) of each side [B], [B])."""
        logits = verdict_logits(model, batch.chosen_ids + batch.rejected_ids, self.pad_id, self.autocast)
        p_yes = torch.sigmoid(logits[:, self.yes] - logits[:, self.no]).detach().cpu()
        return logits[: batch.size], logits[batch.size :], p_yes[: batch.size], p_yes[batch.size :]

    def loss_fn(self, engine, batch: PairBatch):
        (total_pairs,) = sum_over_ranks([float(batch.size)])

        def loss_fn(micro: PairBatch):
            chosen, rejected, p_chosen, p_rejected = self.scores(engine.model, micro)
            loss = self.loss(chosen, rejected, self.yes, self.no) / total_pairs  # this micro-batch's share
            return loss, {"loss/judge": loss.detach(), "rm/accuracy": (p_chosen > p_rejected).float().mean(),
                          "rm/margin": (p_chosen - p_rejected).mean(), "judge/p_yes_chosen": p_chosen.mean(),
                          "judge/p_yes_rejected": p_rejected.mean()}  # fmt: skip

        return loss_fn

    @torch.no_grad()
    def evaluate(self, engine) -> tuple[dict[str, float], str]:
        """Pairwise accuracy (P(Yes|chosen) > P(Yes|rejected)) and the mean gap of P(Yes), every rank all pairs."""
        gaps = []
        for start in range(0, len(self.held_out), self.eval_batch_size):
            index = list(range(start, min(start + self.eval_batch_size, len(self.held_out))))
            _, _, p_chosen, p_rejected = self.scores(engine.model, pair_batch(self.held_out, index, 0.0))
            gaps.append(p_chosen - p_rejected)
        return pairwise_results(torch.cat(gaps), self.held_out)

    def final_files(self) -> dict[str, str]:
        """Written beside the exported model: the question it learned to answer, which reward=judge asks it."""
        import json

        return {TRAINED_JUDGE_FILE: json.dumps({"form": self.form, "template": self.template}, indent=2) + "\n"}


def load_rm_model(path: str, tokenizer, dtype: str, trust_remote_code: bool, seed: int):
    """The reward model to train: a sequence classifier with one label on the body of ``path`` (a
    causal LM, or a reward model to train further). ``random:<kind>`` builds a tiny one."""
    from transformers import AutoModelForSequenceClassification

    if path.startswith(models.RANDOM_PREFIX):
        config = models.random_config_for(path, tokenizer)
        config.num_labels = 1
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return AutoModelForSequenceClassification.from_config(config, dtype=getattr(torch, dtype))
    from transformers.utils import logging as hf_logging

    source = models.resolve(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the new head "missing": that is the point here
    with torch.random.fork_rng():  # the new head's initial weights follow engine.seed
        torch.manual_seed(seed)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise RlctlError(f"model.path: cannot load {path!r} as a reward model: {models.first_line(err)}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not padding
    return model


def judge_template_of(cfg: DictConfig) -> str:
    return cfg.judge_template if cfg.judge_template is not None else PAIR_TEMPLATES[cfg.judge_form]


def read_rm_settings(cfg: DictConfig, ranks: Ranks):
    """Every value of the ``rm`` config checked, one-line errors naming the key; nothing loaded."""
    settings = OfflineSettings(per_step=cfg.pairs_per_step, epochs=cfg.epochs, steps=cfg.steps,
                               eval_enabled=cfg.eval.enabled, eval_every=cfg.eval.every)  # fmt: skip
    optim, zero, micro = read_engine_settings(cfg, "rm", "pairs_per_step", ranks)
    if not math.isfinite(cfg.margin):
        raise RlctlError(f"margin: must be a finite number, got {cfg.margin}")
    if not (math.isfinite(cfg.center_rewards_coefficient) and cfg.center_rewards_coefficient >= 0):
        raise RlctlError(f"center_rewards_coefficient: must be ≥ 0 (0 = off), got {cfg.center_rewards_coefficient}")
    if cfg.head not in HEADS:
        raise RlctlError(f"head: must be one of {list(HEADS)}, got {cfg.head!r}")
    if cfg.head == "judge":
        for key, value in (("margin", cfg.margin), ("center_rewards_coefficient", cfg.center_rewards_coefficient)):
            if value != 0:
                raise RlctlError(f"{key}: a Bradley-Terry setting; head=judge trains the Yes/No answer and takes none "
                                 f"(got {value})")  # fmt: skip
        if cfg.judge_loss not in JUDGE_LOSSES:
            raise RlctlError(f"judge_loss: must be one of {JUDGE_LOSSES.names()}, got {cfg.judge_loss!r}")
        if cfg.judge_form not in FORMS:
            raise RlctlError(f"judge_form: must be one of {list(FORMS)}, got {cfg.judge_form!r}")
        template = judge_template_of(cfg)
        if "{answer}" in template or (cfg.judge_form == "question" and "{completion}" not in template):
            raise RlctlError(
                f"judge_template: must contain {{completion}} (form question) and no {{answer}} (preference pairs hold "
                f"no reference answer), got {template!r}"
            )
    if cfg.eval.batch_size < 1:
        raise RlctlError(f"eval.batch_size: must be ≥ 1, got {cfg.eval.batch_size}")
    if read_lora(cfg).enabled and cfg.head != "judge":
        raise RlctlError(
            f"model.lora.r: rlctl rm trains the whole reward model, its new score head with it; leave it at 0 "
            f"(got {cfg.model.lora.r}), or train a judge, which keeps the LM's own head: head=judge"
        )
    data = fill("data", cfg.data, PreferenceSpec)
    models.check_path(cfg.model.path, "model.path")
    return settings, data, optim, zero, micro


def build_rm(cfg: DictConfig, run_dir: Path, resume_command: str) -> OfflineRun:
    """Config -> the reward-model run: every check, the pairs, then the model."""
    from rlctl.build import prepare_process

    ranks = launched_ranks()
    settings, data, optim, zero, micro = read_rm_settings(cfg, ranks)
    prepare_process(cfg.engine)
    train_pairs, held_out_pairs = load_pairs(data)  # data errors come before any model loads
    resume_from, config = open_run_folder(cfg, run_dir, ranks)
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    judging = cfg.head == "judge"
    if judging:  # questions left-padded, as the judge reward asks them
        verdicts = verdict_token(tokenizer, "Yes", "model.path"), verdict_token(tokenizer, "No", "model.path")
        train, held_out = (encode_judge_questions(p, tokenizer, cfg.judge_form, judge_template_of(cfg), data.max_tokens)
                           for p in (train_pairs, held_out_pairs))  # fmt: skip
    else:
        tokenizer.padding_side = "right"
        train, held_out = (encode_pairs(p, tokenizer, data.max_tokens) for p in (train_pairs, held_out_pairs))
    if len(train) == 0:
        raise RlctlError(f"data: every training pair has a side longer than data.max_tokens={data.max_tokens}")
    steps = settings.total_steps(len(train), ranks.world_size)
    if judging:  # a causal LM, with an adapter under model.lora as in sft and dpo
        model = load_policy(cfg, tokenizer, resume_from)
    else:
        model = load_rm_model(str(resume_from / "model") if resume_from else cfg.model.path, tokenizer, cfg.model.dtype,
                              cfg.model.trust_remote_code, cfg.engine.seed)  # fmt: skip
    engine, logger = start_training(cfg, model, optim, zero, ranks, steps, run_dir)
    for name, pairs in (("training", train), ("held-out", held_out)):
        if pairs.skipped:
            logger.message(f"[yellow]data: {pairs.skipped} {name} pairs skipped (a side longer than "
                           f"data.max_tokens={data.max_tokens})")  # fmt: skip
    say_when_nothing_is_held_out(logger, "pairs", len(train), len(held_out), settings.eval_enabled)
    name = type(engine.unwrapped()).__name__
    if judging:
        objective = JudgeObjective(name, train, held_out, cfg.judge_form, judge_template_of(cfg), *verdicts, cfg.eval.batch_size,
                                   tokenizer.pad_token_id, engine.autocast, JUDGE_LOSSES.get(cfg.judge_loss))  # fmt: skip
    else:
        objective = RewardModelObjective(name, train, held_out, cfg.margin, cfg.eval.batch_size, tokenizer.pad_token_id,
                                         engine.autocast, cfg.center_rewards_coefficient)  # fmt: skip
    return OfflineRun(
        name="rm", objective=objective, tokenizer=tokenizer, engine=engine,
        sampler=PromptSampler(len(train), settings.per_step * ranks.world_size, data.seed), settings=replace(
            settings, eval_enabled=settings.eval_enabled and len(held_out) > 0),
        micro_batch_size=micro, logger=logger, checkpoints=fill("checkpoint", cfg.checkpoint, CheckpointPolicy),
        run_dir=run_dir, steps=steps, save_final=cfg.save_final, ranks=ranks, resume_from=resume_from,
        resume_command=resume_command, config=config,
    )  # fmt: skip
