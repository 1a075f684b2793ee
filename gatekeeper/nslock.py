"""A lock per network namespace: one holder of a name (an interface, the agent) per namespace.

An flock on `/run/gatekeeper/<name>-<netns inode>.lock`, held for the life of the process and
released by the kernel when the process dies, so a crashed holder never blocks its successor.
The holder's PID is written into the file for the refusal message. `/run` is shared by the
processes of one host whatever their mount namespace, so two processes in one network
namespace always see the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_DIR = Path("/run/gatekeeper")


class LockHeld(RuntimeError):
    """Another live process holds the lock; `holder` is its PID when known."""

    def __init__(self, holder: int | None) -> None:
        super().__init__(f"held by pid {holder}" if holder else "held by another process")
        self.holder = holder


def netns_id() -> str:
    try:
        return str(os.stat("/proc/thread-self/ns/net").st_ino)
    except OSError:
        return "host"


class NamespaceLock:
    def __init__(self, name: str, directory: Path = LOCK_DIR) -> None:
        self.path = directory / f"{name}-{netns_id()}.lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock; LockHeld when a live process has it, OSError when /run is not ours."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()[:32]
            handle.close()
            raise LockHeld(int(text) if text.isdigit() else None) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.seek(0)
                self._handle.truncate()
            self._handle.close()
            self._handle = None
