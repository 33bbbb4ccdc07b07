"""The batch layout of a step: how many samples, split into which minibatches and micro-batches, on
how many processes. Derived once from the config by ``build`` (and printed by ``dry_run``), so the
loop, DeepSpeed's batch sizes and the printed summary can never disagree."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlctl.errors import RlctlError


@dataclass(frozen=True)
class BatchLayout:
    """Sizes are per process unless named ``*_all``: each process samples its own prompts and
    trains on its own samples, and the gradients of one minibatch are summed over processes."""

    prompts_per_step: int  # P, per process
    group_size: int  # G completions per prompt
    world_size: int  # processes
    minibatch_size: int  # samples per optimiser update, per process
    micro_batch_size: int  # samples per forward/backward
    num_iterations: int  # passes over the step's samples
    max_prompt_tokens: int  # data.max_prompt_tokens
    max_new_tokens: int  # rollout.max_new_tokens
    fixed_accumulation: bool  # DeepSpeed: every minibatch is the same number of equal micro-batches
    max_tokens_per_micro_batch: int = 0  # > 0: micro-batches by padded token count instead of rows
    share_prompts: bool = False  # a micro-batch's rows with one prompt run it once (scoring.pack_by_prompt)

    @classmethod
    def derive(
        cls, prompts_per_step: int, group_size: int, world_size: int, minibatch_size: int, micro_batch_size: int,
        num_iterations: int, max_prompt_tokens: int, max_new_tokens: int, fixed_accumulation: bool,
        max_tokens_per_micro_batch: int = 0, share_prompts: bool = False,
    ) -> BatchLayout:  # fmt: skip
        """Check the sizes against each other (one-line errors naming the key) and fill the defaults:
        minibatch 0 = the step's batch; a micro-batch is never larger than the minibatch."""
        if prompts_per_step < 1:
            raise RlctlError(f"prompts_per_step: must be ≥ 1, got {prompts_per_step}")
        samples = prompts_per_step * group_size
        minibatch = minibatch_size or samples
        if samples % minibatch:
            raise RlctlError(
                f"optim.minibatch_size: {minibatch} does not divide the step's batch of "
                f"prompts_per_step × algo.group_size = {prompts_per_step} × {group_size} = {samples}"
            )
        micro = min(micro_batch_size, minibatch)
        if fixed_accumulation and minibatch % micro:
            raise RlctlError(
                f"optim.micro_batch_size: {micro_batch_size} must divide the minibatch of {minibatch} samples under "
                "DeepSpeed (it needs a fixed number of equal micro-batches per update)"
            )
        if max_tokens_per_micro_batch < 0:
            raise RlctlError(
                f"optim.max_tokens_per_micro_batch: must be ≥ 0 (0 = by rows), got {max_tokens_per_micro_batch}"
            )
        if max_prompt_tokens < 1:
            raise RlctlError(f"data.max_prompt_tokens: must be ≥ 1, got {max_prompt_tokens}")
        return cls(prompts_per_step, group_size, world_size, minibatch, micro, num_iterations, max_prompt_tokens,
                   max_new_tokens, fixed_accumulation, max_tokens_per_micro_batch, share_prompts)  # fmt: skip

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def minibatches_per_step(self) -> int:
        return self.samples_per_step // self.minibatch_size

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per minibatch (the last one may be smaller on the plain engine)."""
        return math.ceil(self.minibatch_size / self.micro_batch_size)

    @property
    def updates_per_step(self) -> int:
        return self.minibatches_per_step * self.num_iterations

    @property
    def max_micro_batch_tokens(self) -> int:
        """An upper bound on the tokens of one micro-batch: every row at both length limits."""
        return self.micro_batch_size * (self.max_prompt_tokens + self.max_new_tokens)

    @property
    def largest_micro_batch_tokens(self) -> int:
        """The most tokens one micro-batch can hold: by rows, every row at both length limits; under a
        token budget, the budget (or one row at both limits, which goes alone when it is longer)."""
        if not self.max_tokens_per_micro_batch:
            return self.max_micro_batch_tokens
        return max(self.max_tokens_per_micro_batch, self.max_prompt_tokens + self.max_new_tokens)

    def _micro_batches_line(self) -> str:
        n, micro = self.accumulation_steps, self.micro_batch_size
        last = self.minibatch_size - micro * (n - 1)
        if last == micro:
            return f"  micro-batches: {micro} samples, {n} per minibatch (gradient accumulation {n})"
        sizes = " + ".join([str(micro)] * (n - 1) + [str(last)])
        return (f"  micro-batches: {n} per minibatch of {self.minibatch_size} samples: {sizes} "
                f"(optim.micro_batch_size={micro}; gradient accumulation {n})")  # fmt: skip

    def describe(self, updates: str = "optimiser updates") -> str:
        """The block printed by ``dry_run=true`` and at the start of every run; ``updates`` names
        what a minibatch makes (TRPO's are trust-region steps)."""
        w = self.world_size
        return "\n".join([
            f"batch layout ({w} process{'es' if w > 1 else ''}):",
            f"  prompts per step: {self.prompts_per_step} per process, {self.prompts_per_step * w} over all processes",
            f"  samples per step: {self.samples_per_step} per process ({self.prompts_per_step} prompts × "
            f"{self.group_size} completions), {self.samples_per_step * w} over all processes",
            f"  minibatches: {self.minibatches_per_step} per step of {self.minibatch_size} samples per process "
            f"({self.minibatch_size * w} over all processes), {self.num_iterations} "
            f"iteration{'s' if self.num_iterations > 1 else ''} over them",
            self._micro_batches_line() if not self.max_tokens_per_micro_batch else
            (f"  micro-batches: ≤ {self.max_tokens_per_micro_batch} tokens each (rows × longest prompt + longest "
             "response), rows of like length together; as many per minibatch as that takes"),
            f"  {updates} per step: {self.updates_per_step}",
            "  prompts: run once per micro-batch, its completions packed after it (optim.share_prompts)"
            if self.share_prompts else "  prompts: run again for every completion (optim.share_prompts=false)",
            f"  largest micro-batch: ≤ {self.max_micro_batch_tokens} tokens ({self.micro_batch_size} × "
            f"({self.max_prompt_tokens} prompt + {self.max_new_tokens} new tokens))" if not self.max_tokens_per_micro_batch
            else f"  largest micro-batch: ≤ {self.largest_micro_batch_tokens} "
            "tokens (a row longer than the budget goes alone)",
        ])  # fmt: skip
