"""A Hydra callback that ends every sweep (`rlctl train|sft|dpo|rm -m ...`) with a table comparing its
jobs, and makes the sweep exit non-zero when any job failed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from rlctl.report import SWEEP_OF, sweep_table

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        command = config.hydra.job.name if config.hydra.job.name in SWEEP_OF else "train"
        sweep_table(sweep_dir, command=command)
        jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        failed = [p for p in jobs if (p / "FAILED").exists()]
        if failed:
            from rlctl.cli import err_console

            err_console.print(
                f"[bold red]error:[/bold red] {len(failed)} of {len(jobs)} sweep jobs failed "
                f"({', '.join(sorted((p.name for p in failed), key=int))}); see {sweep_dir / 'summary.md'}",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
            sys.exit(1)
