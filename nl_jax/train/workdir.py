"""The training workdir before any compile: it must be a writable directory that no other
trainer holds.

`prepare(workdir)` creates it if needed and proves it writable; `WorkdirLock` is a lock file
`<workdir>/train.lock` holding the host and pid of the trainer that owns the run. A lock whose
process is gone (same host, no such pid) is stale and taken over; any other lock makes a second
trainer stop with a message that names the holder.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import time
from collections.abc import Callable
from typing import Any

LOCK_NAME = "train.lock"
# A lock file that is still empty or half-written this long after it was created is left over
# from a crash between create and write, not a trainer that is starting.
_UNREADABLE_LOCK_GRACE_S = 30.0


class WorkdirError(RuntimeError):
    """The workdir cannot be used: not a directory, not writable, or held by another trainer."""


def prepare(workdir: pathlib.Path) -> list[pathlib.Path]:
    """Create `workdir` if needed and prove it writable; returns the directories created."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(
            f"--workdir {workdir} is a file, not a directory; pass the path of a new directory "
            "or of a previous run's workdir."
        )
    created = [p for p in [workdir, *workdir.parents] if not p.exists()][::-1]
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        remove_created(created)
        raise WorkdirError(
            f"--workdir {workdir} is not writable ({e.strerror or type(e).__name__}: "
            f"{e.filename or workdir}); fix its permissions or free space, or pass another "
            "--workdir. Nothing was written."
        ) from None
    return created


def remove_created(created: list[pathlib.Path]) -> None:
    """Remove the directories `prepare` created, innermost first, where they are still empty."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_holder(path: pathlib.Path) -> dict[str, Any] | None:
    """The lock file's `{"host", "pid", "since"}`, or None where it is missing or unreadable."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def is_stale(path: pathlib.Path, holder: dict[str, Any] | None) -> bool:
    """True where the lock's trainer is certainly gone (same host, no such process)."""
    if holder is None:
        try:
            return time.time() - path.stat().st_mtime > _UNREADABLE_LOCK_GRACE_S
        except OSError:
            return True
    return holder.get("host") == socket.gethostname() and not _alive(int(holder["pid"]))


# Locks this process holds: `release_held` frees them where a `finally` cannot run.
_HELD: list[WorkdirLock] = []


def release_held() -> None:
    """Release every lock this process holds (before an immediate `os._exit`)."""
    for lock in list(_HELD):
        lock.release()


class WorkdirLock:
    """`<workdir>/train.lock`: one trainer per workdir."""

    def __init__(self, workdir: pathlib.Path, echo: Callable[[str], None] = print) -> None:
        """Describe (not take) the lock of `workdir`."""
        self.path = workdir / LOCK_NAME
        self._echo = echo
        self._held = False

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; `WorkdirError` if another trainer holds it."""
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.path)
                if not is_stale(self.path, holder):
                    raise WorkdirError(self._busy_message(holder)) from None
                who = "an unreadable lock" if holder is None else f"pid {holder['pid']}"
                self._echo(f"[lock] {self.path}: {who} is no longer running; taking the lock over")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            _HELD.append(self)
            return
        raise WorkdirError(self._busy_message(read_holder(self.path)))

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        who = (
            f"pid {holder['pid']} on host {holder.get('host')} (since {holder.get('since')})"
            if holder
            else "a trainer that is starting"
        )
        return (
            f"--workdir {self.path.parent} is in use by another trainer: {who} holds "
            f"{self.path}. Wait for it to finish or stop it, or pass another --workdir; delete "
            "the lock file only if that process is gone."
        )

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self._held:
            holder = read_holder(self.path)
            if holder is None or int(holder["pid"]) == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False
            if self in _HELD:
                _HELD.remove(self)
