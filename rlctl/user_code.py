"""Loading what a user wrote in a file of their own: ``"path/to/file.py:name"``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rlctl.errors import RlctlError


def load_from_file(spec: str, key: str, what: str = "function"):
    """The object ``name`` defined in ``path/to/file.py``, for ``spec = "path/to/file.py:name"``.
    ``key`` names the setting and ``what`` the kind of object ("function", "class") in errors:
    one line for a malformed spec, a missing file, an import that raises, a missing name."""
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise RlctlError(f"{key}: expected 'path/to/file.py:{what}', got {spec!r}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise RlctlError(f"{key}: file not found: {file}")
    module_spec = importlib.util.spec_from_file_location(f"rlctl_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's module may raise anything while importing
        raise RlctlError(f"{key}: importing {file} failed: {type(err).__name__}: {err}") from None
    found = getattr(module, name, None)
    wanted = isinstance(found, type) if what == "class" else callable(found)
    if not wanted:
        defined = sorted(
            k for k, v in vars(module).items()
            if not k.startswith("_") and (isinstance(v, type) if what == "class" else callable(v))
            and getattr(v, "__module__", None) == module.__name__
        )  # fmt: skip
        raise RlctlError(f"{key}: {file} defines no {what} {name!r} (it defines: {defined})")
    return found
