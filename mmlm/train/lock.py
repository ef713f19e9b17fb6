"""The workdir lock: one `mmlm train` per workdir at a time.

`WORKDIR/train.lock` holds the owner's pid, host and start time and is
locked with `fcntl.flock` for the life of the run. The kernel drops the flock
when the owner exits in any way (error, Ctrl-C, SIGKILL), so a lock file whose
flock can be taken is stale: it is taken over, with a message naming the dead
owner. A second run finds the flock held and is refused (`UserError`, exit 2)
with the owner's pid and host. The file is removed when the run ends.

flock is advisory and per host: on a file system shared between hosts
without flock support (some NFS setups) it does not exclude a run on another
host; the file's host field is still reported.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from mmlm.errors import UserError

LOCK_FILE = "train.lock"
log = logging.getLogger(__name__)


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for one training run (see the module docstring)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        for _ in range(10):  # retried only if the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise UserError(
                    f"--workdir {self.workdir!r} is in use by another mmlm train ({_describe(owner)}; lock file "
                    f"{self.path}); wait for it to finish or stop it (kill {owner.get('pid', 'PID')}), or use "
                    "another --workdir") from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without flock
                    log.warning("cannot lock %s (%s): running without the workdir lock; make sure no other "
                                "mmlm train uses this workdir", self.path, e.strerror or e)
                    return self
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner removed the file after we opened it: lock the new one
                os.close(fd)
                continue
            previous = _read(fd)
            if previous.get("pid"):
                log.warning("took over the stale lock %s of a run that is no longer running (%s)", self.path,
                            _describe(previous))
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
            os.fsync(fd)
            self.fd = fd
            return self
        raise UserError(f"cannot lock --workdir {self.workdir!r}: {self.path} keeps being replaced by another "
                        "process; is another mmlm train starting there?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it: a newcomer then locks a fresh file
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
