"""Losses on preference pairs: the reward model's Bradley-Terry loss, the judge's two, and DPO's family.

Each returns the SUM over the pairs given; the caller divides by the number of pairs of the whole
batch over all ranks, so micro-batches and ranks add up to the batch mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlctl.algos.registry import Registry


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Σ_i −log σ(r_c,i − r_r,i − m_i). chosen, rejected, margins: [B] -> scalar."""
    return -F.logsigmoid(chosen - rejected - margins).sum()


JudgeLoss = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
JUDGE_LOSSES: Registry[JudgeLoss] = Registry("judge loss")


def verdict_margin(logits: torch.Tensor, yes: int, no: int) -> torch.Tensor:
    """m = z_Yes − z_No, the judge's log-odds of "Yes" against "No" (its score is σ(m)). [B, V] -> [B]."""
    return logits[:, yes] - logits[:, no]


@JUDGE_LOSSES.register("pairwise")
def judge_pairwise_loss(chosen_logits: torch.Tensor, rejected_logits: torch.Tensor, yes: int, no: int) -> torch.Tensor:
    """Bradley-Terry on the judge's verdict margins m = z_Yes − z_No of the two questions of a pair:

        L = Σ_i −log σ(m_c,i − m_r,i)

    chosen_logits, rejected_logits: [B, V], the logits after each question -> scalar. Only the two
    verdict logits of each side get a gradient: ∂L/∂m_c,i = −σ(m_r,i − m_c,i) = −∂L/∂m_r,i. Like the
    scalar reward model, it asks only that the chosen reply rank above the rejected one of the same
    prompt, so what the prompt alone says (how often its replies are right) cancels out."""
    return -F.logsigmoid(verdict_margin(chosen_logits, yes, no) - verdict_margin(rejected_logits, yes, no)).sum()


@JUDGE_LOSSES.register("yes_no")
def judge_loss(chosen_logits: torch.Tensor, rejected_logits: torch.Tensor, yes: int, no: int) -> torch.Tensor:
    """Cross-entropy of a judge's verdict token: "Yes" after the question about the chosen reply, "No"
    after the one about the rejected reply, over the whole vocabulary:

        L = Σ_i ½·[−log softmax(z_c,i)_Yes − log softmax(z_r,i)_No]

    chosen_logits, rejected_logits: [B, V], the logits at the position after each question -> scalar.
    Its gradient in z_c,i is ½·(softmax(z_c,i) − onehot(Yes)), in z_r,i ½·(softmax(z_r,i) − onehot(No))."""
    return 0.5 * (-F.log_softmax(chosen_logits, dim=-1)[:, yes] - F.log_softmax(rejected_logits, dim=-1)[:, no]).sum()


def implicit_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward of a reply, β·(log π(y|x) − log π_ref(y|x)). [B] -> [B]."""
    return beta * (logp - ref_logp)


DpoLoss = Callable[[torch.Tensor, float, float], torch.Tensor]
DPO_LOSSES: Registry[DpoLoss] = Registry("preference loss")


@DPO_LOSSES.register("sigmoid")
def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), with conservative label smoothing ε (Mitchell 2023):

        L = Σ_i −(1 − ε)·log σ(β·h_i) − ε·log σ(−β·h_i)

    h [B] = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)), sequence log-probs.
    ε = 0 is plain DPO: the preference label is trusted; ε > 0 treats it as flipped with that chance.
    """
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)).sum()


@DPO_LOSSES.register("ipo")
def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): L = Σ_i (h_i − 1/(2β))². It regresses the log-ratio gap to a fixed
    target instead of pushing it to infinity, so it does not overfit deterministic preferences.
    β plays τ's role; label smoothing has no meaning here (it must be 0). h is the gap of summed
    log-ratios (the paper's Eq. 17), or of per-token means with ``ipo_length_normalised`` (TRL)."""
    return ((h - 1 / (2 * beta)) ** 2).sum()


def chosen_nll(logp_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen replies' length-normalised negative log-likelihood, Σ_i −log π(y_c,i) / |y_c,i|
    (the NLL term of RPO, Pang et al. 2024). logp_chosen [B] sequence log-probs, chosen_tokens [B]
    their token counts -> scalar (a sum over pairs, like the preference losses)."""
    return -(logp_chosen / chosen_tokens.clamp(min=1)).sum()


def dpo_loss(
    logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
    nll_coef: float = 0.0, chosen_tokens: torch.Tensor | None = None,
    length_normalised: bool = False, rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The preference loss of B pairs (a sum over them) and the stats DPO runs are read by.

    logp_*, ref_*: [B] sequence log-probs Σ_t log π(y_t | x, y_<t) over each reply's tokens, of the
    policy and of the reference. With ``nll_coef`` α > 0 the loss adds α·chosen_nll (chosen_tokens
    [B] needed): plain DPO can lower the chosen replies' likelihood as long as the rejected ones
    fall faster; the NLL term keeps the chosen replies likely. Stats (means over the B pairs): the
    implicit rewards of the chosen and the rejected reply, their margin, and how often the chosen
    one's is higher.

    ``length_normalised``: each reply's log-ratio is divided by its token count before the gap is
    taken, h = (log π(y_c) − log π_ref(y_c)) / |y_c| − (log π(y_r) − log π_ref(y_r)) / |y_r|
    (chosen_tokens and rejected_tokens [B] needed): TRL's IPO, which keeps β comparable across reply
    lengths. The implicit-reward stats stay on the summed log-ratios.
    """
    chosen_ratio, rejected_ratio = logp_chosen - ref_chosen, logp_rejected - ref_rejected
    if length_normalised:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("length_normalised needs both replies' token counts")
        chosen_ratio = chosen_ratio / chosen_tokens.clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_tokens.clamp(min=1)
    h = chosen_ratio - rejected_ratio
    loss = DPO_LOSSES.get(loss_type)(h, beta, label_smoothing)
    nll = None
    if nll_coef:
        if chosen_tokens is None:
            raise ValueError("nll_coef > 0 needs the chosen replies' token counts")
        nll = chosen_nll(logp_chosen, chosen_tokens)
        loss = loss + nll_coef * nll
    with torch.no_grad():
        chosen = implicit_rewards(logp_chosen, ref_chosen, beta)
        rejected = implicit_rewards(logp_rejected, ref_rejected, beta)
        stats = {"dpo/reward_chosen": chosen.mean(), "dpo/reward_rejected": rejected.mean(),
                 "dpo/reward_margin": (chosen - rejected).mean(), "dpo/accuracy": (chosen > rejected).float().mean()}  # fmt: skip
        if nll is not None:
            stats["dpo/nll_chosen"] = nll / len(logp_chosen)
    return loss, stats
