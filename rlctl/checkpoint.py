"""Saving models: atomic HF-format export (safetensors) that ``from_pretrained`` loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_hf_folder(model, tokenizer, target: Path) -> Path:
    """Write ``model`` and ``tokenizer`` to ``target`` atomically: into a temporary sibling, then rename.

    A crash mid-write leaves at most a ``*.tmp`` folder, never a half-written ``target``.
    """
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for file in tmp.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
