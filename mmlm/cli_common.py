"""Plumbing shared by the `mmlm` subcommands: quiet library logs, one error path.

`run_command` runs a subcommand's `run(args)` and turns a `UserError` into
one line on stderr and exit status 2; `MMLM_DEBUG=1` shows the traceback
instead, for bug reports.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable

from mmlm.errors import UserError


def quiet_library_logs() -> None:
    """Keeps Orbax/absl INFO and WARNING chatter (e.g. "directory is read only") off a transcript."""
    for name in ("absl", "orbax", "jax._src"):
        logging.getLogger(name).setLevel(logging.ERROR)


def debug_requested() -> bool:
    return os.environ.get("MMLM_DEBUG", "") not in ("", "0")


def run_command(name: str, run: Callable[[Any], int], args: Any, *, interruptible: bool = False,
                quiet_logs: bool = True) -> int:
    """Runs `run(args)`: a `UserError` becomes `mmlm NAME: error: ...` and exit status 2.

    `interruptible`: Ctrl-C ends the command quietly with exit status 130.
    """
    if quiet_logs:
        quiet_library_logs()
    try:
        return run(args)
    except UserError as e:
        if debug_requested():
            raise
        print(f"mmlm {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not interruptible:
            raise
        print("", file=sys.stderr)
        return 130


def print_report(report: Any, as_json: bool, table: Callable[[], None]) -> int:
    """A command's result: `report` as indented JSON on stdout (`--json`), else `table()` prints it. Returns 0."""
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        table()
    return 0
