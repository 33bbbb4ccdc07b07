"""What the bench scripts share: a train run built from overrides and stepped in this process."""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_train_steps(overrides: list[str]):
    """Build ``rlctl train`` with these overrides (no console, no evaluation, no final save) and run
    its steps here. -> (stages, cfg, one metrics dict per step with its wall time as "step_s")."""
    from hydra import compose, initialize_config_dir

    from rlctl.build import build_train
    from rlctl.cli import CONF_DIR
    from rlctl.config import register_schemas
    from rlctl.trainer import TrainState, train_step

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=["logger.console=false", "eval.enabled=false", "save_final=false", *overrides])
    stages = build_train(cfg, Path(tempfile.mkdtemp(prefix="rlctl-bench-")))
    state = TrainState(kl_coef=stages.algo.kl_coef)
    rows = []
    for _ in range(cfg.steps):
        state.step += 1
        start = time.perf_counter()
        metrics = train_step(stages, state)
        rows.append({"step_s": time.perf_counter() - start, **metrics})
    return stages, cfg, rows
