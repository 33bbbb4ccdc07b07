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

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlctl.errors import RlctlError

LATEST = "latest"
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


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "trainer_state.json").read_text())
