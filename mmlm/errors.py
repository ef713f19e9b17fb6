"""The project's error type for user mistakes.

Everything a user can get wrong (a config key, a path, an argument, a
damaged or mismatched workdir) raises `UserError` with a message that names
the key / file / value, what was expected and how to fix it. The CLIs print
it as one line and exit with status 2; any other exception is an internal
error and keeps its traceback. This module sits at the bottom of the layering
so that models, data, train and infer can all raise it.
"""

from __future__ import annotations

import errno
import os
import shutil


class UserError(Exception):
    """A user-facing error: printed by the CLI without a traceback (exit status 2)."""


class ConfigError(UserError, ValueError):
    """A mistake in a config file or a `--config.a.b=value` override (a `UserError`)."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or an exception it wraps) is a write that failed on a full disk or an exhausted quota.

    Libraries that write in threads (Orbax, TensorStore) re-raise such failures as their own types, with
    the OS error as the cause or only in the message.
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_message(path: str | os.PathLike | None) -> str:
    """One line for a write to `path` that failed on a full disk: the path and the free space left there."""
    path = os.fspath(path) if path else ""
    where = os.path.abspath(path) if path else os.getcwd()
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"no space left on the device writing {path or where!r} ({free}); free some space or write elsewhere"


class DiskFullError(UserError):
    """A write failed because the disk is full: not a bug, and the message says where and how much is free."""
