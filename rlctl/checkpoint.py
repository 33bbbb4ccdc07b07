"""Checkpoints: atomic writes, a ``latest`` marker, keep-last-N, exact resume, HF-format export.

Layout of ``RUN/checkpoints/``::

    step-000004/            one complete checkpoint
      policy/               save_pretrained model + tokenizer (safetensors)
      critic/               the critic, when the algorithm has one
      engines.pt            optimiser and scheduler state of each trainable model (torch.save, tensors only)
      rng.pt                torch RNG state; python and numpy states are in trainer_state.json
      trainer_state.json    step, KL coefficient, sampler position, health counters, model identity
    latest                  the name of the newest complete checkpoint, written last
    final/                  the trained policy alone, for from_pretrained / rlctl eval

Each checkpoint is written to ``step-N.tmp``, flushed to disk, then renamed; ``latest`` is replaced
atomically afterwards. A crash at any point leaves the previous checkpoint and marker intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
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


def save_hf_folder(model, tokenizer, target: Path) -> Path:
    """Write ``model`` and ``tokenizer`` to ``target`` atomically: a temporary sibling, then a rename."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _fsync_tree(tmp)
    _replace_atomically(tmp, target)
    return target


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python and numpy RNG states, torch RNG tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return json_part, {"torch": torch.get_rng_state()}


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])


@dataclass(frozen=True)
class Snapshot:
    """Everything a checkpoint holds besides the weights, as plain values."""

    trainer_state: dict[str, Any]  # step, kl_coef, sampler, health counters, model identity …
    engines: dict[str, dict[str, Any]]  # name -> {"optimizer": state_dict, "scheduler": state_dict}


def save_checkpoint(
    checkpoints: Path, step: int, models: dict[str, Any], tokenizer, snapshot: Snapshot, keep_last: int
) -> Path:
    """Write ``checkpoints/step-N`` atomically, then point ``latest`` at it, then prune old ones."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = checkpoints / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for model_name, model in models.items():
        model.save_pretrained(tmp / model_name, safe_serialization=True)
    tokenizer.save_pretrained(tmp / "policy")
    torch.save(snapshot.engines, tmp / "engines.pt")
    rng_json, rng_tensors = rng_state()
    torch.save(rng_tensors, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**snapshot.trainer_state, "rng": rng_json}))
    _fsync_tree(tmp)
    _replace_atomically(tmp, checkpoints / name)
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


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(trainer_state with the RNG states restored, engine states) from a checkpoint folder."""
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    engines = torch.load(folder / "engines.pt", weights_only=True)
    set_rng_state(trainer_state.pop("rng"), torch.load(folder / "rng.pt", weights_only=True))
    return trainer_state, engines
