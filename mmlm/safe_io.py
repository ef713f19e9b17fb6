"""Safe outputs and confined inputs: what every command that writes or opens user-named paths relies on.

* Complete-or-nothing writes. `atomic_file` writes a file under a temporary
  sibling name and renames it over the target once it is complete (fsynced).
  `DirectoryReplacement` does the same for a directory: the new content is
  written into the sibling `.NAME.mmlm-new` and swapped in by one atomic
  exchange (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames through
  the sibling `.NAME.mmlm-old`); the old content is deleted only after that.
  The swap runs with SIGINT/SIGTERM/SIGHUP deferred (`signals_deferred`), so a
  signal at any moment leaves either the old or the new content complete. A
  leftover of a run killed harder (SIGKILL, power loss) is repaired by the
  next write of the same output (`recover_directory`).
* Outputs never replace inputs: `check_not_input` compares resolved paths
  (symlinks and `..` followed) and refuses an output that is, lies inside or
  contains an input; `refuse_existing` refuses to replace an earlier result
  without `--overwrite`. Both raise `UserError` naming the file (exit 2).
* Media paths stay under their root: `confined_path(root, rel)` resolves
  `root/rel` and returns None when it leaves `root` (`..`, an absolute path,
  a symlink pointing outside). `mmlm data build`, `mmlm eval` and the server
  skip such records.

This module sits at the bottom of the layering (it imports only `errors`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping

from mmlm.errors import UserError

NEW_SUFFIX = ".mmlm-new"  # `.NAME.mmlm-new`: a directory being written (or, after the exchange, the old one)
OLD_SUFFIX = ".mmlm-old"  # `.NAME.mmlm-old`: the old directory between the two renames of the fallback swap
TMP_TAG = ".mmlm-tmp"  # `.NAME.mmlm-tmp-PID[.ext]`: a file being written
# Tests set this to a stage name ("staged": a new directory is complete but not swapped in; "swap": inside its
# swap; "file": a new file is complete but not renamed): the process prints `mmlm-test-pause: STAGE` to stderr
# and sleeps there, so that a test can signal it.
TEST_PAUSE_ENV = "MMLM_TEST_PAUSE_IN_WRITE"
_DEFERRED = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


def _test_pause(stage: str) -> None:
    if os.environ.get(TEST_PAUSE_ENV) == stage:
        print(f"mmlm-test-pause: {stage}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get(TEST_PAUSE_ENV + "_SECONDS", "30")))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds SIGINT/SIGTERM/SIGHUP for the duration of the block and delivers them after it.

    For the few renames that swap an output in: Python handlers run in the
    main thread only, so outside it (or where handlers cannot be set) the
    block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    try:
        for s in _DEFERRED:
            previous[s] = signal.signal(s, lambda signum, frame: caught.append(signum))
    except (ValueError, OSError):  # not settable here: restore what was changed and run unprotected
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        previous = {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)  # now the command's own handler (or the default action) runs


# ------------------------------------------------------------------------- path checks

def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True if `path` is `root` or lies under it, after resolving both (symlinks, `..`)."""
    p, r = _real(path), _real(root)
    return os.path.commonpath([p, r]) == r


def confined_path(root: str | os.PathLike, rel: str) -> Path | None:
    """`root/rel` resolved (symlinks too); None if it lies outside `root`.

    `rel` is relative to `root`; an absolute `rel`, `..` components or a
    symlink that leads out of `root` all give None. The caller reports the
    record as `path_escapes_root` and skips it.
    """
    base = _real(root)
    full = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([base, full]) != base:
        return None
    return Path(full)


def check_not_input(output: str | os.PathLike, out_flag: str, inputs: Mapping[str, str | os.PathLike | None],
                    *, inside: bool = True, contains: bool = True) -> None:
    """Refuses an output that would replace an input (compared after resolving symlinks and `..`).

    `inputs`: {flag or description: path} (None entries are ignored). The
    output must not be an input, nor (with `inside`) lie inside an input
    directory, nor (with `contains`, for an output directory that is replaced
    as a whole) contain an input.
    """
    out = _real(output)
    for flag, path in inputs.items():
        if path is None or path == "":
            continue
        src = _real(path)
        if out == src:
            raise UserError(f"{out_flag} {os.fspath(output)!r} is the input {flag} {os.fspath(path)!r} (after "
                            f"resolving links): an output never replaces an input; choose another {out_flag}")
        if inside and os.path.commonpath([out, src]) == src:
            raise UserError(f"{out_flag} {os.fspath(output)!r} lies inside the input {flag} {os.fspath(path)!r}; "
                            f"choose an {out_flag} outside it")
        if contains and os.path.commonpath([out, src]) == out:
            raise UserError(f"the input {flag} {os.fspath(path)!r} lies inside {out_flag} {os.fspath(output)!r}, "
                            f"which would be replaced; choose another {out_flag}")


def refuse_existing(path: str | os.PathLike, flag: str, overwrite: bool, what: str = "") -> None:
    """Refuses to replace an existing `path` without `--overwrite` (`what`: what it holds, for the message)."""
    if not overwrite and os.path.lexists(path):
        raise UserError(f"{flag} {os.fspath(path)!r} already exists{f' ({what})' if what else ''}; pass "
                        f"--overwrite to replace it, or choose another {flag}")


# ------------------------------------------------------------------------- files

def _tmp_sibling(path: str) -> str:
    head, name = os.path.split(path)
    root, ext = os.path.splitext(name)
    # The extension stays last so that writers choosing a format by it (PIL, PyAV) still do.
    return os.path.join(head, f".{root}{TMP_TAG}-{os.getpid()}{ext}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, fsync: bool = True) -> Iterator[str]:
    """Yields a temporary sibling path to write `path`'s new content to; renames it over `path` on success.

    With `fsync` the file reaches the disk before the rename (a power loss
    then also leaves the old or the new file; without it a signal or crash of
    the process still does). On an exception the temporary file is removed
    and `path` is unchanged. A symlink at `path` is followed (its target is
    replaced).
    """
    target = _real(path)
    tmp = _tmp_sibling(target)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        _test_pause("file")
        with signals_deferred():
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


# ------------------------------------------------------------------------- directories

def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the directory entries `a` and `b` (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # the file system cannot exchange: the two-rename fallback
    raise OSError(err, f"cannot swap {b!r} into place: {os.strerror(err)}", a)


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def sibling(target: str, suffix: str) -> str:
    head, name = os.path.split(target.rstrip(os.sep))
    return os.path.join(head, f".{name}{suffix}")


def recover_directory(target: str | os.PathLike) -> str | None:
    """Repairs what an interrupted `DirectoryReplacement` of `target` left; returns what it did (or None).

    `.NAME.mmlm-old` without `NAME`: killed between the two renames, the old
    content is put back. `.NAME.mmlm-old` with `NAME`: the new content was in
    place, the old one is deleted. `.NAME.mmlm-new`: an unfinished new
    content (or an old one not yet deleted) is deleted.
    """
    target = _real(target)
    old, new = sibling(target, OLD_SUFFIX), sibling(target, NEW_SUFFIX)
    done = []
    if os.path.lexists(old):
        if os.path.lexists(target):
            _remove(old)
            done.append(f"deleted the replaced copy {old}")
        else:
            os.rename(old, target)
            done.append(f"restored {target} from {old} (a replacement was interrupted)")
    if os.path.lexists(new):
        _remove(new)
        done.append(f"deleted the unfinished {new}")
    return "; ".join(done) or None


class DirectoryReplacement:
    """Writes a directory's new content beside it and swaps it in only when complete.

        with DirectoryReplacement(dst) as tmp:
            ... write everything into tmp ...
        # dst now holds the new content; the old one is gone

    On entry a leftover of an interrupted earlier replacement is repaired
    (`recover_directory`) and an empty `.NAME.mmlm-new` created. On a clean
    exit it is swapped with `dst` (created if absent) and the old content is
    deleted; on an exception it is deleted and `dst` is untouched. `dst` is
    resolved first, so a symlink to a directory keeps pointing at the
    (replaced) directory.
    """

    def __init__(self, dst: str | os.PathLike, log=None):
        self.target = _real(dst)
        self.new = sibling(self.target, NEW_SUFFIX)
        self.old = sibling(self.target, OLD_SUFFIX)
        self.log = log

    def __enter__(self) -> str:
        note = recover_directory(self.target)
        if note and self.log:
            self.log(note)
        os.makedirs(os.path.dirname(self.target), exist_ok=True)
        os.mkdir(self.new)
        return self.new

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.new, ignore_errors=True)
            return
        self.commit()

    def commit(self, files: Mapping[str | os.PathLike, str | os.PathLike] | None = None) -> None:
        """Swaps the new content in; `files` ({complete temporary file: target}) are renamed over their
        targets in the same signal-deferred step (e.g. a report next to the directory)."""
        _test_pause("staged")
        if os.path.lexists(self.target) and not (os.path.isdir(self.target) and not os.path.islink(self.target)):
            raise UserError(f"{self.target!r} exists and is not a directory; choose a directory path")
        with signals_deferred():
            if not os.path.lexists(self.target):
                os.rename(self.new, self.target)
            elif not _exchange(self.new, self.target):  # exchanged: the new content in place, the old in .new
                os.rename(self.target, self.old)
                _test_pause("swap")
                os.rename(self.new, self.target)
                os.rename(self.old, self.new)
            else:
                _test_pause("swap")
            for tmp, final in (files or {}).items():
                os.replace(tmp, final)
        shutil.rmtree(self.new, ignore_errors=True)
