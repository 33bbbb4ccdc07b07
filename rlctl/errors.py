"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class RlctlError(Exception):
    """A problem with the user's input (config, data, paths) that they can fix.

    The message must say what was wrong and where: the config key, the file, the row.
    """


def first_line(err: Exception) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_fields(obj, checks) -> None:
    """For a settings object's ``__post_init__``: raise ``ValueError("key: requirement, got value")``
    for the first ``(key, ok, requirement)`` that fails (``config.fill`` prefixes the group)."""
    for key, ok, requirement in checks:
        if not ok:
            raise ValueError(f"{key}: {requirement}, got {getattr(obj, key)!r}")
