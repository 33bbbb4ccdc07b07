"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class RlctlError(Exception):
    """A problem with the user's input (config, data, paths) that they can fix.

    The message must say what was wrong and where: the config key, the file, the row.
    """
