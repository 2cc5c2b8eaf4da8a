"""DirLock: one trainer at a time per run directory (`--run-dir`) and per checkpoint directory (`--save`).

    lock = DirLock.acquire(Path("runs/x"), flag="--run-dir")   # ValueError naming the holder when another has it
    lock.release()

Two trainers writing one directory interleave their metrics (steps 0, 0, 1, 1, 2) and mix their checkpoints. The lock
is the file `DIR/.r3rl.lock`, held with `fcntl.flock(LOCK_EX | LOCK_NB)` for the run's life, holding one JSON line:
pid, host, start time and command of the holder, so a refused run can name it. The kernel drops a flock when its
process ends, however it ends (kill -9 included): a lock file left by a dead trainer is stale and free, so the next
run takes it over and logs the dead holder. The file itself stays (unlinking a flock file races with a new holder).
Creating the directory and the lock file are the run's first writes there, so a directory that cannot be written
is a one-line ValueError naming the flag before any work.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["DirLock", "LOCK_NAME"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".r3rl.lock"


class DirLock:
    def __init__(self, directory: Path, fd: int) -> None:
        self.directory, self._fd = directory, fd

    @classmethod
    def acquire(cls, directory: str | Path, *, flag: str) -> DirLock:
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{flag} {directory}: cannot create the directory ({e.strerror or e})") from None
        path = directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ValueError(f"{flag} {directory} is not writable: cannot create {path} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ValueError(f"{flag} {directory} is in use by another trainer ({_who(holder)}): two runs in one "
                             f"directory mix their metrics and checkpoints; stop it or choose another {flag}") from None
        except OSError as e:
            os.close(fd)
            raise ValueError(f"{flag} {directory}: cannot lock {path} ({e.strerror or e})") from None
        previous = _read(fd)
        if previous:
            alive = _alive(previous)
            logger.warning("%s %s: taking over a stale lock of %s%s", flag, directory, _who(previous),
                           "" if alive else ", which no longer runs" if alive is False else "")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return cls(directory, fd)

    def release(self) -> None:
        """Empty the file (a clean exit leaves no stale holder) and drop the lock; safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor drops the flock

    def __del__(self) -> None:  # a Trainer that failed half-built: do not hold the directory until exit
        self.release()


def _read(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return {"unreadable": True}


def _who(holder: dict | None) -> str:
    if not holder or "pid" not in holder:
        return "holder unknown: its lock file is empty or unreadable"
    return (f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def _alive(holder: dict) -> bool | None:
    """Whether the holder's pid runs (None: another host, or unknown)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
