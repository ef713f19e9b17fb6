"""Plumbing shared by the `mmlm` subcommands: quiet library logs, one error path.

`run_command` runs a subcommand's `run(args)` and turns a `UserError` into
one line on stderr and exit status 2; `MMLM_DEBUG=1` shows the traceback
instead, for bug reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Callable

from mmlm.errors import UserError, disk_full_message, is_disk_full


def quiet_library_logs() -> None:
    """Keeps Orbax/absl INFO and WARNING chatter (e.g. "directory is read only") off a transcript."""
    for name in ("absl", "orbax", "jax._src"):
        logging.getLogger(name).setLevel(logging.ERROR)


def debug_requested() -> bool:
    return os.environ.get("MMLM_DEBUG", "") not in ("", "0")


def run_command(name: str, run: Callable[[Any], int], args: Any, *, interruptible: bool = False,
                quiet_logs: bool = True) -> int:
    """Runs `run(args)`: a `UserError` becomes `mmlm NAME: error: ...` and exit status 2.

    A write that fails on a full disk is reported the same way (the path and the free space there).
    `interruptible`: Ctrl-C ends the command with `mmlm NAME: interrupted` and exit status 130.
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
        print(f"mmlm {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a write on a full disk anywhere in the command: one line, not a traceback
        if not is_disk_full(e) or debug_requested():
            raise
        print(f"mmlm {name}: error: {disk_full_message(e.filename)}", file=sys.stderr)
        return 2


def number(kind: type = float, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], Any]:
    """An argparse `type`: an int or a finite float in [low, high] (bounds optional, open where asked).

    A value outside the range, not finite (nan, inf) or not a number is an argparse error:
    `mmlm CMD: error: argument --flag: expected ..., got 'nan'`, exit status 2.
    """
    if low is None and high is None:
        expected = "an integer" if kind is int else "a finite number"
    elif high is None:
        expected = f"{'an integer' if kind is int else 'a number'} {'>' if low_open else '>='} {low}"
    elif low is None:
        expected = f"{'an integer' if kind is int else 'a number'} {'<' if high_open else '<='} {high}"
    else:
        expected = (f"{'an integer' if kind is int else 'a number'} in "
                    f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and math.isfinite(value) and \
            (low is None or (value > low if low_open else value >= low)) and \
            (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = "integer" if kind is int else "number"  # argparse names the type in some messages
    return convert


SEED = number(int, 0, 2**32 - 1)  # seeds: what numpy and jax.random accept


def add_model_source(p: argparse.ArgumentParser) -> None:
    """The model a command loads: `--workdir W [--step N]` (a training workdir) or `--checkpoint DIR`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (latest checkpoint + config.json)")
    src.add_argument("--checkpoint", help="model checkpoint directory (config.json + params/)")
    p.add_argument("--step", type=number(int, 0), default=None, help="with --workdir: checkpoint step (default: latest)")


def check_output_file(path: str, flag: str) -> None:
    """An output file path whose directory exists and is writable, and which is not a directory itself."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a directory; give a file name (e.g. a new file inside it)")
    if not os.path.exists(parent):
        raise UserError(f"{flag} {path!r}: the directory {parent!r} does not exist; create it first")
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path!r}: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path!r} is not writable (check the permissions of {parent!r})")


def print_report(report: Any, as_json: bool, table: Callable[[], None]) -> int:
    """A command's result: `report` as indented JSON on stdout (`--json`), else `table()` prints it. Returns 0."""
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        table()
    return 0
