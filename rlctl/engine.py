"""The optimisation engine: the one place that owns a trainable model's optimiser, scheduler,
mixed precision and (later) DeepSpeed. The trainer only calls backward / step / autocast."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from rlctl.errors import RlctlError


@dataclass(frozen=True)
class OptimSpec:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: str = "constant"  # constant | linear | cosine, after warm-up
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    total_updates: int = 1


SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_accelerator(precision: str) -> Accelerator:
    if precision not in ("no", "bf16", "fp16"):
        raise RlctlError(f"engine.precision: must be one of no | bf16 | fp16, got {precision!r}")
    return Accelerator(mixed_precision=precision)


class Engine:
    """Wraps one trainable model: AdamW, a warm-up + decay schedule, gradient clipping."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, spec: OptimSpec):
        if spec.lr <= 0 or not math.isfinite(spec.lr):
            raise RlctlError(f"optim.lr: must be a positive number, got {spec.lr}")
        if spec.schedule not in SCHEDULES:
            raise RlctlError(f"optim.schedule: unknown schedule {spec.schedule!r}; known: {sorted(SCHEDULES)}")
        self.accelerator, self.spec = accelerator, spec
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay
        )
        scheduler = get_scheduler(
            SCHEDULES[spec.schedule],
            optimizer,
            num_warmup_steps=spec.warmup_steps,
            num_training_steps=spec.total_updates,
        )
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)

    def autocast(self):
        """Mixed-precision context for forward passes outside the wrapped model's own (e.g. generate)."""
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> float:
        """Clip, step the optimiser and the schedule, clear gradients; returns the pre-clip gradient norm.

        A non-finite gradient norm (from a NaN/inf loss or overflow) skips the update entirely: the
        gradients are dropped and neither the weights, the optimiser moments nor the schedule move.
        The caller sees the non-finite norm and counts the skip.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.spec.max_grad_norm if self.spec.max_grad_norm > 0 else float("inf")
        grad_norm = float(self.accelerator.clip_grad_norm_(params, max_norm))
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def state_dict(self) -> dict:
        """Optimiser and schedule state, for exact resume (the weights are saved separately)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)
