"""One run per directory: an exclusive lock on a training workdir or an evaluation out_dir.

``DirLock(directory, field)`` holds ``<directory>/.advgame_jax.lock`` with ``fcntl.flock``
(exclusive, non-blocking). The lock file records who holds it (pid, host, start time, command)
so that a second run on the same directory is refused at once with one line: ``<dir> is in
use by pid N on HOST (since ...)``. The kernel drops a ``flock`` when its holder dies, even
under ``kill -9``, so a crashed run never blocks the next one; a lock file left behind by a
dead holder is stale, and is taken over (with a note of whose it was).

Stale-lock detection for file systems where ``flock`` is not shared (some NFS set-ups): when
the lock can be taken but the file names a holder on THIS host whose pid is alive, is not us
and still runs the recorded command, the holder's lock was not seen by the kernel, so the
directory is refused all the same; a pid reused by another program is not a holder.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Optional

from absl import logging

from advgame_jax.errors import UserError

LOCK_FILE = ".advgame_jax.lock"


class DirectoryInUseError(UserError, RuntimeError):
    """Another live run holds the directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
        f"(since {holder.get('since', '?')})"
    )


class DirLock:
    """Exclusive lock on ``directory`` (created if needed); ``field`` names the flag or config
    field in messages (``config.workdir``, ``--out_dir``). Use as a context manager or call
    :meth:`acquire` / :meth:`release`."""

    def __init__(self, directory: str, field: str):
        self.directory = os.path.abspath(directory)
        self.field = field
        self.path = os.path.join(self.directory, LOCK_FILE)
        self._fd: Optional[int] = None

    def _read_holder(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 1 << 16)
            holder = json.loads(data.decode("utf-8")) if data.strip() else {}
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "DirLock":
        if self._fd is not None:
            return self
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd)
                raise DirectoryInUseError(
                    f"{self.field}={self.directory!r} is in use by {_describe(holder)}; wait "
                    f"for that run to finish, stop it, or use another directory"
                ) from None
            holder = self._read_holder(fd)
            me, host = os.getpid(), socket.gethostname()
            pid = holder.get("pid")
            if (
                holder.get("host") == host
                and isinstance(pid, int)
                and pid != me
                and _pid_alive(pid)
                and _same_command(pid, holder.get("command"))
            ):
                raise DirectoryInUseError(
                    f"{self.field}={self.directory!r} is in use by {_describe(holder)} (its "
                    f"lock is not visible to this file system's flock; stop that run or use "
                    f"another directory)"
                )
            if holder:
                logging.warning(
                    "%s: taking over a stale lock of %s (that run has ended)",
                    self.directory,
                    _describe(holder),
                )
            record = {
                "pid": me,
                "host": host,
                "since": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M:%S UTC"
                ),
                "command": " ".join(sys.argv)[:500],
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays, emptied: an empty lock file is never stale)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_command(pid: int, command) -> bool:
    """True when the live process ``pid`` still runs the recorded ``command`` (a pid reused
    by an unrelated program does not keep a lock alive)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return True  # no /proc: assume it may be the holder
    live = " ".join(a.decode("utf-8", "replace") for a in args if a)
    return isinstance(command, str) and bool(command) and command[:200] in live
