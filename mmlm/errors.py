"""The project's error type for user mistakes.

Everything a user can get wrong (a config key, a path, an argument, a
damaged or mismatched workdir) raises `UserError` with a message that names
the key / file / value, what was expected and how to fix it. The CLIs print
it as one line and exit with status 2; any other exception is an internal
error and keeps its traceback. This module sits at the bottom of the layering
so that models, data, train and infer can all raise it.
"""

from __future__ import annotations


class UserError(Exception):
    """A user-facing error: printed by the CLI without a traceback (exit status 2)."""
