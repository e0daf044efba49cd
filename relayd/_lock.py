"""The state directory's lock: one relayd at a time works on a state directory.

Two daemons on one store would each take themselves for the only relay: a message queued by
one stays queued while its recipient is connected to the other, and one client can hold a
session on each. So whoever works on the state directory (``relayd serve`` for its whole life,
a ``relayd admin`` command on a stopped daemon's store for the moments it takes) holds an
exclusive ``flock`` on ``state_dir/relayd.lock``, and writes who it is into that file so that
the one refused can name the holder.

Rules:

1. The lock is the ``flock``, never the file: the kernel releases it when the last descriptor
   of the holder's open file closes, whatever the exit (``kill -9`` and OOM kills included).
   A lock file left after a crash locks nothing; its contents name the last holder.
2. The file is never deleted. Deleting it would let two processes lock two different files
   under the same name (one holding the unlinked one, one a new one).
3. The holder's record (pid, host, start time, command) is written only once the lock is
   held, so a refused process never touches it.

``flock`` locks belong to an open file, not to a process: two opens in one process exclude
each other too, which is what lets a test run two daemons in one interpreter.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from attrs import frozen

from ._errors import ConfigError, RelaydError

LOCK_FILE = "relayd.lock"


@frozen
class Holder:
    """Who holds (or last held) a state directory's lock."""

    command: str
    pid: int
    host: str
    started: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        return f"relayd {self.command} (pid {self.pid} on {self.host}, started {since})"

    def to_json(self) -> str:
        return json.dumps(
            {"command": self.command, "pid": self.pid, "host": self.host, "started": self.started}
        )

    @classmethod
    def from_json(cls, text: str) -> Holder | None:
        """The record in a lock file, or ``None`` if it holds none (yet) or is not one."""
        try:
            doc = json.loads(text)
            return cls(
                command=str(doc["command"]),
                pid=int(doc["pid"]),
                host=str(doc["host"]),
                started=float(doc["started"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


class StateDirLocked(RelaydError):
    """Another process holds the state directory's lock; the message names it.

    ``holder`` is ``None`` when the holder has not written its record yet (it has just taken
    the lock).
    """

    def __init__(self, path: Path, holder: Holder | None) -> None:
        who = holder.describe() if holder else "another process (not yet named in the file)"
        super().__init__(
            f"{path.parent} is in use by {who}, which holds {path}: one state directory serves"
            " one relayd. Stop that one first, or give this one a state_dir of its own."
        )
        self.path = path
        self.holder = holder


class StateLock:
    """A held lock on a state directory. Release it with :meth:`release` or ``with``."""

    def __init__(self, path: Path, fd: int, holder: Holder) -> None:
        self.path = path
        self.holder = holder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path, *, command: str) -> StateLock:
        """Take the lock of ``state_dir`` (which must exist) without waiting, and write the
        record naming this process as ``relayd <command>``.

        Raises:
            StateDirLocked: another process holds it; its record is in the error.
            ConfigError: the lock file cannot be opened or written.
        """
        path = state_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.from_json(_read(fd))
            os.close(fd)
            raise StateDirLocked(path, holder) from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"state_dir: cannot lock {path}: {exc.strerror}") from None
        holder = Holder(
            command=command, pid=os.getpid(), host=socket.gethostname(), started=time.time()
        )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder.to_json() + "\n").encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"state_dir: cannot write {path}: {exc.strerror}") from None
        return cls(path, fd, holder)

    def release(self) -> None:
        """Release the lock: close the file, never delete it (rule 2). Safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> StateLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    return ""
