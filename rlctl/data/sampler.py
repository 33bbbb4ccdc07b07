"""Seeded prompt order: a fresh permutation every epoch, resumable from (epoch, position)."""

from __future__ import annotations

import torch


class PromptSampler:
    """Yields lists of `batch_size` prompt indices, reshuffling with ``seed + epoch`` at each epoch end."""

    def __init__(self, n_prompts: int, batch_size: int, seed: int = 0):
        if n_prompts < 1:
            raise ValueError("the sampler needs at least one prompt")
        self.n_prompts, self.batch_size, self.seed = n_prompts, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_prompts, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.position == self.n_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), self.n_prompts - self.position)
            batch += self._order[self.position : self.position + take]
            self.position += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
