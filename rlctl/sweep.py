"""A Hydra callback that ends every `rlctl train -m ...` sweep with a table comparing its jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from rlctl.report import sweep_table

        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            sweep_table(sweep_dir)
