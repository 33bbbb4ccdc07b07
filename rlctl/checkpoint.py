"""Checkpoints: atomic writes, a ``latest`` marker, keep-last-N, exact resume, HF-format export.

Layout of ``RUN/checkpoints/``::

    step-000004/            one complete checkpoint
      policy/               save_pretrained model + tokenizer (safetensors), and the optimiser and
                            schedule state (engine.pt, or deepspeed/ with each rank's shard)
      critic/               the same for the critic, when the algorithm has one
      rng-<rank>.pt         each rank's python, numpy and torch RNG states
      trainer_state.json    step, KL coefficient, sampler position, health counters, model identity
    latest                  the name of the newest complete checkpoint, written last
    final/                  the trained policy alone, for from_pretrained / rlctl eval

Every rank writes its part into ``step-N.tmp``; then the main rank flushes it to disk and renames
it, and only then replaces ``latest`` atomically. A crash at any point leaves the previous checkpoint and marker intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlctl.distributed import barrier
from rlctl.errors import RlctlError, check_fields

LATEST = "latest"


@dataclass(frozen=True)
class CheckpointPolicy:
    """The ``checkpoint`` config group, filled by field name."""

    every: int  # steps between resumable checkpoints (0 = only at the end)
    keep_last: int  # resumable checkpoints kept
    max_consecutive_skips: int  # stop after this many non-finite updates in a row

    def __post_init__(self) -> None:
        check_fields(self, (("every", self.every >= 0, "must be ≥ 0"), ("keep_last", self.keep_last >= 1, "must be ≥ 1"),
                            ("max_consecutive_skips", self.max_consecutive_skips >= 1, "must be ≥ 1")))  # fmt: skip


@dataclass
class TrainState:
    """What changes from step to step besides the models (and what a checkpoint must keep)."""

    step: int = 0
    kl_coef: float = 0.0
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    consecutive_reward_failures: int = 0  # steps in a row where a reward term failed on every sample
    consecutive_tool_failures: int = 0  # steps in a row where every tool call of a multi-turn rollout failed
    eval_before: dict | None = None
    evaluations: list = field(default_factory=list)  # [{"step", "reward", "gold"}]: every held-out evaluation's means
    gold_warned: bool = False  # the over-optimisation warning was given (once a run)
    best: dict | None = None  # checkpoints/best: {"step", "by", "value", "reward_mean", "gold_mean"}


_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def publish_folder(tmp: Path, target: Path) -> Path:
    """Make a fully written folder visible under its final name: flush it, then rename over ``target``."""
    _fsync_tree(tmp)
    _replace_atomically(tmp, target)
    return target


def save_rng(folder: Path, rank: int) -> None:
    """This rank's python, numpy and torch RNG states (each rank samples differently)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}  # fmt: skip
    torch.save(state, Path(folder) / f"rng-{rank}.pt")


def load_rng(folder: Path, rank: int) -> None:
    state = torch.load(Path(folder) / f"rng-{rank}.pt", weights_only=True)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def begin_checkpoint(checkpoints: Path, step: int, is_main: bool) -> Path:
    """The temporary folder every rank writes its part of checkpoint ``step`` into."""
    tmp = checkpoints / f"step-{step:06d}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, keep_last: int) -> Path:
    """Main rank, once every rank has written: flush, rename, point ``latest`` at it, prune old ones."""
    checkpoints, name = tmp.parent, tmp.name.removesuffix(".tmp")
    publish_folder(tmp, checkpoints / name)
    marker_tmp = checkpoints / f"{LATEST}.tmp"
    marker_tmp.write_text(name + "\n")
    with marker_tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(marker_tmp, checkpoints / LATEST)
    _prune(checkpoints, keep_last, protect=name)
    return checkpoints / name


def _prune(checkpoints: Path, keep_last: int, protect: str) -> None:
    steps = sorted((int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for _, path in steps[: max(0, len(steps) - keep_last)]:
        if path.name != protect:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_or_checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under a run folder (or its checkpoints/ folder), or None."""
    folder = Path(run_or_checkpoints)
    if (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    marker = folder / LATEST
    if not marker.exists():
        return None
    candidate = folder / marker.read_text().strip()
    return candidate if (candidate / "trainer_state.json").exists() else None


def last_good_checkpoint(run_dir: Path) -> str:
    """For the message of a run that stops: the newest complete checkpoint, or that there is none."""
    last = latest_checkpoint(run_dir)
    return str(last) if last is not None else "none (no checkpoint was saved yet)"


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``never`` -> None; ``auto`` -> the newest checkpoint in this run folder (None if there is none);
    a path -> that checkpoint, or the newest one inside that run folder (an error if there is none)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if (path / "trainer_state.json").exists():
        return path
    found = latest_checkpoint(path) if path.exists() else None
    if found is None:
        raise RlctlError(
            f"resume: no complete checkpoint at {path} (expected a step-N folder or a run folder with checkpoints/latest)"
        )
    return found


def drop_metrics_after(metrics: Path, step: int) -> None:
    """Resuming at ``step``: rows logged after that checkpoint (by a run that then crashed or was
    killed) are dropped, so the continued run never logs a step twice."""
    if not metrics.exists():
        return
    lines = metrics.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = metrics.with_name(metrics.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, metrics)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "trainer_state.json").read_text())


def amend_trainer_state(folder: Path, changes: dict[str, Any]) -> None:
    """Replace some values of a complete checkpoint's loop state, atomically (what the last step's
    final evaluation decided, which comes after that checkpoint was written). Main rank only."""
    file = Path(folder) / "trainer_state.json"
    tmp = file.with_name("trainer_state.json.tmp")
    tmp.write_text(json.dumps({**read_trainer_state(folder), **changes}))
    os.replace(tmp, file)


# --- the training run's checkpoints (every rank takes part) ------------------------------------


@contextlib.contextmanager
def disk_full_said(run_dir: Path, tmp: Path):
    """A write that runs out of disk (an OSError, or safetensors' own error, saying so) becomes one
    line naming what was being written and what is safe, after the partial folder is removed."""
    try:
        yield
    except Exception as err:
        if "No space left on device" not in str(err) and getattr(err, "errno", None) != errno.ENOSPC:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise RlctlError(
            f"checkpoint: writing {tmp.name.removesuffix('.tmp')} in {tmp.parent} failed: no space left on device; the "
            f"last complete checkpoint is {last_good_checkpoint(run_dir)}; free disk space (or lower "
            "checkpoint.keep_last) and run the same command again to resume"
        ) from None


def write_checkpoint(
    run_dir: Path, step: int, engines: dict, tokenizer, ranks, keep_last: int, trainer_state: dict
) -> Path:
    """Checkpoint ``step`` of a run: each engine's weights and optimiser state under its name (the
    tokenizer beside the first), every rank's RNG, and ``trainer_state`` (main rank), made visible
    atomically. Every rank calls."""
    tmp = begin_checkpoint(run_dir / "checkpoints", step, ranks.is_main)
    barrier()
    with disk_full_said(run_dir, tmp):
        for index, (name, engine) in enumerate(engines.items()):
            engine.save(tmp / name, tokenizer if index == 0 else None)
        save_rng(tmp, ranks.rank)
        if ranks.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    path = tmp.with_name(tmp.name.removesuffix(".tmp"))
    barrier()
    if ranks.is_main:
        path = commit_checkpoint(tmp, keep_last)
    barrier()
    return path


def export_model(run_dir: Path, engine, tokenizer, ranks, name: str = "final") -> Path:
    """``RUN/checkpoints/final`` (or ``name``): the engine's model and the tokenizer as an HF folder
    (weights gathered under ZeRO-3), written atomically. Every rank calls."""
    final = run_dir / "checkpoints" / name
    tmp = final.with_name(f"{name}.tmp")
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with disk_full_said(run_dir, tmp):
        engine.save(tmp, tokenizer, training_state=False)
    barrier()
    if ranks.is_main:
        publish_folder(tmp, final)
    barrier()
    return final


class StopRequest:
    """SIGTERM or Ctrl-C ask the loop to stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self, acknowledge=None):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._acknowledge = acknowledge  # called with a line the moment a signal arrives

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some launchers): no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self._acknowledge is not None:
            again = "; Ctrl-C again to abandon it" if signum == signal.SIGINT else ""
            self._acknowledge(f"{self.signal_name}: stopping after this step, then saving{again}")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
