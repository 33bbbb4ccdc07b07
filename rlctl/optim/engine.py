"""The optimisation engines: the one place that owns a trainable model's optimiser, scheduler,
mixed precision and data parallelism. ``Engine`` is plain PyTorch through accelerate (one
process); ``DeepSpeedEngine`` is DeepSpeed ZeRO 0–3 (one or many processes). Both offer the same
calls, so the trainer only ever says backward / step / autocast / save."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from rlctl.errors import RlctlError, check_fields
from rlctl.lora import is_adapted, merged_weights, save_adapted, scaling_of


@dataclass(frozen=True)
class OptimSpec:
    """The ``optim`` config group (filled by field name) and the number of updates the run makes."""

    lr: float
    betas: tuple[float, float] | list[float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: str = "constant"  # constant | linear | cosine, after warm-up
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    minibatch_size: int = 0  # samples per optimiser update (0 = the step's batch); read by the batch layout
    micro_batch_size: int = 8  # samples per forward/backward; read by the batch layout
    max_tokens_per_micro_batch: int = 0  # padded tokens per forward/backward (0 = by rows); read by the batch layout
    share_prompts: bool = True  # completions scored after one copy of their prompt; read by the batch layout
    total_updates: int = 1

    def __post_init__(self) -> None:
        betas = tuple(self.betas)
        checks = (
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be a positive number"),
            ("betas", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "must be two numbers in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be ≥ 0"),
            ("eps", self.eps > 0, "must be > 0"),
            ("schedule", self.schedule in SCHEDULES, f"unknown schedule; known: {sorted(SCHEDULES)}"),
            ("warmup_steps", self.warmup_steps >= 0, "must be ≥ 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, "must be ≥ 0 (0 = no clipping)"),
            ("minibatch_size", self.minibatch_size >= 0, "must be ≥ 0 (0 = the step's whole batch)"),
            ("micro_batch_size", self.micro_batch_size >= 1, "must be ≥ 1"),
        )  # fmt: skip
        check_fields(self, checks)
        object.__setattr__(self, "betas", betas)


SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def adamw_with_schedule(model: torch.nn.Module, spec: OptimSpec, on_cpu: bool = False):
    """AdamW over the trainable parameters (DeepSpeed's CPU Adam when the optimiser is offloaded)
    and the warm-up + decay schedule, both from ``spec`` (checked when the spec was made)."""
    params = [p for p in model.parameters() if p.requires_grad]
    hyper = {"lr": spec.lr, "betas": spec.betas, "eps": spec.eps, "weight_decay": spec.weight_decay}
    if on_cpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **hyper)
    else:
        optimizer = torch.optim.AdamW(params, **hyper)
    scheduler = get_scheduler(
        SCHEDULES[spec.schedule], optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=spec.total_updates
    )
    return optimizer, scheduler


PRECISIONS = ("no", "bf16", "fp16")


def make_accelerator(precision: str) -> Accelerator:
    if precision not in PRECISIONS:
        raise RlctlError(f"engine.precision: must be one of no | bf16 | fp16, got {precision!r}")
    return Accelerator(mixed_precision=precision)


def whole_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A model's weights under their checkpoint names, one tensor at a time; an adapted model's
    merged, under the base model's names (what a rollout engine's copy takes)."""
    weights = iter(model.state_dict().items())
    yield from merged_weights(weights, scaling_of(model)) if is_adapted(model) else weights


def save_hf_folder(model: torch.nn.Module, folder: Path, tokenizer=None, whole: bool = True) -> None:
    """A model as an HF folder (+ tokenizer); an adapted model's adapter alone unless ``whole``
    (then merged + adapter)."""
    if is_adapted(model):
        save_adapted(model, folder, model.state_dict(), whole=whole)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


class Engine:
    """Wraps one trainable model: AdamW, a warm-up + decay schedule, gradient clipping."""

    world_size = 1  # one process: the loss given to backward is the whole minibatch's

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, spec: OptimSpec):
        self.accelerator, self.spec = accelerator, spec
        self.weights_version = 0  # +1 whenever the weights change: a rollout engine compares it to its copy's
        optimizer, scheduler = adamw_with_schedule(model, spec)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)

    def autocast(self):
        """Mixed-precision context for forward passes outside the wrapped model's own (e.g. generate)."""
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss``, this micro-batch's share of the minibatch loss."""
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
            self.weights_version += 1
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

    synced_generation = False  # every rank holds the whole weights: generating is local

    def generation_context(self):
        """Around a whole rollout: nothing to do when every rank holds the full weights."""
        return contextlib.nullcontext()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full weights under their checkpoint names, one tensor at a time (a rollout engine's
        copy); an adapted model's merged, under the base model's names."""
        yield from whole_weights(self.unwrapped())

    def save(self, folder: Path, tokenizer=None, training_state: bool = True) -> None:
        """The weights as an HF folder (+ tokenizer), and the optimiser/schedule state for resume.
        An adapted model: its adapter alone in step checkpoints; merged + adapter in the final one."""
        save_hf_folder(self.unwrapped(), folder, tokenizer, whole=not training_state)
        if training_state:
            torch.save(self.state_dict(), Path(folder) / "engine.pt")

    def load_training_state(self, folder: Path) -> None:
        self.load_state_dict(torch.load(Path(folder) / "engine.pt", weights_only=True))
        self.weights_version += 1


class ReplicaEngine:
    """The policy of a trust-region run (algo=trpo): a whole replica on every rank and no optimiser,
    since TRPO's step is computed, not learned. With several processes, ``sum_over_ranks`` adds a
    tensor over ranks (the gradient, each Fisher-vector product, the line search's losses and KL
    sums), so every rank takes the same step; the weights start equal (loaded alike) and stay equal.
    Same calls as :class:`Engine` for everything else (rollout sync, checkpoints, autocast)."""

    lr = None  # no learning rate: the step's size is set by algo.max_kl

    def __init__(self, model: torch.nn.Module, precision: str, world_size: int, rank: int, local_rank: int = 0):
        if precision not in ("no", "bf16"):
            raise RlctlError(
                f"engine.precision: the trust-region step runs in fp32 or bf16 autocast, got {precision!r}"
            )
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        self.model = model.to(self.device)
        self.precision, self.world_size, self.rank = precision, world_size, rank
        self.weights_version = 0  # +1 whenever the weights change: a rollout engine compares it to its copy's

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss``, this rank's micro-batch share of the minibatch loss."""
        loss.backward()

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def step(self) -> float:
        raise RuntimeError(
            "a trust-region policy has no optimiser: its update is optim.trust_region.trust_region_update"
        )

    def unwrapped(self) -> torch.nn.Module:
        return self.model

    synced_generation = False  # a whole replica on every rank

    def generation_context(self):
        return contextlib.nullcontext()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full weights under their checkpoint names (an adapted model's merged, under the base names)."""
        yield from whole_weights(self.model)

    def save(self, folder: Path, tokenizer=None, training_state: bool = True) -> None:
        """The weights as an HF folder (+ tokenizer), from rank 0 (every rank holds the same); an
        adapted model's adapter alone in step checkpoints. No optimiser state: nothing else to resume."""
        if self.rank == 0:
            save_hf_folder(self.model, folder, tokenizer, whole=not training_state)

    def load_training_state(self, folder: Path) -> None:
        self.weights_version += 1  # the weights came from the checkpoint at build; there is no other state


class FrozenPolicy:
    """A model that is not trained (``rlctl eval`` / ``generate``), offered to a rollout backend
    through the same calls as an engine."""

    weights_version = 0

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def unwrapped(self) -> torch.nn.Module:
        return self.model

    synced_generation = False

    def generation_context(self):
        return contextlib.nullcontext()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.model.state_dict().items()


@dataclass(frozen=True)
class ZeroSpec:
    """The ``deepspeed`` config group (filled by field name) and what rlctl derives for DeepSpeed
    from the other groups (never repeated by hand)."""

    enabled: bool  # train under DeepSpeed (else the plain engine)
    stage: int  # ZeRO stage 0 (data parallel), 1 (optimiser state), 2 (+ gradients), 3 (+ parameters)
    offload_optimizer: bool
    offload_params: bool
    precision: str  # no | bf16 | fp16 (engine.precision)
    micro_batch_size: int  # samples per forward/backward on one rank
    accumulation_steps: int  # micro-batches per optimiser update on one rank
    world_size: int

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"stage: ZeRO stages are 0, 1, 2 and 3, got {self.stage}")
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params: parameters can be offloaded only under ZeRO-3 (deepspeed.stage=3)")


def deepspeed_config(spec: OptimSpec, zero: ZeroSpec, trainable: bool = True) -> dict:
    """The DeepSpeed JSON config for one model. Gradient accumulation is ours (``step()`` is the
    boundary: ``managed_gradient_accumulation`` off), clipping is ``optim.max_grad_norm``."""
    stage = {"stage": zero.stage, "overlap_comm": False, "stage3_gather_16bit_weights_on_model_save": True}
    if zero.offload_optimizer and trainable:
        stage["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero.offload_params:
        stage["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": zero.micro_batch_size,
        "gradient_accumulation_steps": zero.accumulation_steps,
        "train_batch_size": zero.micro_batch_size * zero.accumulation_steps * zero.world_size,
        "zero_optimization": stage,
        "bf16": {"enabled": zero.precision == "bf16"},
        "fp16": {"enabled": zero.precision == "fp16", "loss_scale": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if trainable:
        config["managed_gradient_accumulation"] = False
        if spec.max_grad_norm > 0:
            config["gradient_clipping"] = spec.max_grad_norm
    return config


class DeepSpeedEngine:
    """One trainable model under DeepSpeed ZeRO; same calls as :class:`Engine`.

    Mixed precision is DeepSpeed's (16-bit weights for compute, fp32 master copy in the optimiser),
    so ``autocast`` is a no-op. Under ZeRO-3 the parameters are partitioned across ranks; a rollout
    gathers them once (``generation_context``) instead of once per generated token.
    """

    def __init__(self, model: torch.nn.Module, spec: OptimSpec, zero: ZeroSpec):
        import deepspeed

        self.spec, self.zero = spec, zero
        optimizer, scheduler = adamw_with_schedule(model, spec, on_cpu=zero.offload_optimizer)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec, zero)
        )
        self.weights_version = 0  # +1 whenever the weights change: a rollout engine compares it to its copy's

    def autocast(self):
        return contextlib.nullcontext()

    @property
    def world_size(self) -> int:
        return self.zero.world_size

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` is this rank's micro-batch share of the minibatch loss over ALL ranks, so the
        minibatch gradient is the SUM of the ranks' gradients; DeepSpeed averages them over the
        ranks, hence the factor world_size. Accumulation is ours too (no division by its steps)."""
        self.model.backward(loss * self.zero.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce gradients across ranks, clip, update, step the schedule; the global gradient norm."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        self.weights_version += 1  # even when DeepSpeed skipped the step: a needless sync beats a stale engine
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.model.get_lr()[0]

    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    @property
    def synced_generation(self) -> bool:
        """Whether generating is collective: under ZeRO-3 on several ranks each layer's weights are
        gathered again at every forward (DeepSpeed releases them after it), so every rank must make
        the same forwards, in step (transformers' ``synced_gpus``), whatever its own sequences need."""
        return self.zero.stage == 3 and self.zero.world_size > 1

    def generation_context(self):
        if self.zero.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.module.parameters()))
        return contextlib.nullcontext()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full weights under their checkpoint names, one tensor at a time. Under ZeRO-3 every
        rank must call: each module's own parameters are gathered, copied out and released before
        the next module's, so no rank ever holds a full copy of the model at once."""
        module = self.model.module
        weights = self._gathered_weights(module)
        yield from merged_weights(weights, scaling_of(module)) if is_adapted(module) else weights

    def _gathered_weights(self, module) -> Iterator[tuple[str, torch.Tensor]]:
        if self.zero.stage != 3:
            yield from module.state_dict().items()
            return
        import deepspeed

        for prefix, sub in module.named_modules():
            own = list(sub.named_parameters(prefix=prefix, recurse=False))
            if not own:
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in own]):
                for name, param in own:
                    yield name, param.data.clone()

    def full_state_dict(self) -> dict | None:
        """Every weight, on rank 0 (None elsewhere); under ZeRO-3 gathered from all ranks, so all must call."""
        if self.zero.stage == 3:
            return self.model._zero3_consolidated_16bit_state_dict()
        return self.model.module.state_dict() if self.model.global_rank == 0 else None

    def save(self, folder: Path, tokenizer=None, training_state: bool = True) -> None:
        """All ranks call: the HF folder from rank 0 (weights gathered under ZeRO-3), and each rank's
        share of the DeepSpeed optimiser state under ``folder/deepspeed``."""
        state = self.full_state_dict()
        if self.model.global_rank == 0 and is_adapted(self.model.module):
            save_adapted(self.model.module, folder, state, whole=not training_state)
        elif self.model.global_rank == 0:
            self.model.module.save_pretrained(folder, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        if training_state:
            self.model.save_checkpoint(str(Path(folder) / "deepspeed"), tag="state", save_latest=False)

    def load_training_state(self, folder: Path) -> None:
        self.model.load_checkpoint(str(Path(folder) / "deepspeed"), tag="state", load_module_strict=True)
        self.weights_version += 1


def frozen_for_inference(model: torch.nn.Module, zero: ZeroSpec | None) -> torch.nn.Module:
    """A frozen model (the reference): partitioned across ranks under ZeRO-3, else a plain replica."""
    model.requires_grad_(False).eval()
    if zero is None:
        return model
    if zero.stage != 3:
        # DeepSpeed runs the policy in 16-bit weights (no autocast); the replica matches it, so KL
        # to the reference is exactly 0 before the first update.
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(zero.precision)
        return model.to(half) if half is not None else model
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(OptimSpec(lr=1.0), zero, trainable=False))
    engine.eval()
    return engine
