"""Run code of this process inside another network namespace, on a thread of its own.

A network namespace belongs to a thread, not to a process: a thread that called setns sees
that namespace's links and sockets, and the children and threads it starts inherit it. Tests
use this to drive real devices in a lab namespace from the test process itself, instead of a
helper process and a protocol to talk to it. Only the network namespace changes: the mount
namespace (and with it /sys and /run) stays the test process's.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import ParamSpec, TypeVar

from gatekeeper.lab.netns import LabError

P = ParamSpec("P")
T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/var/run/netns"


def _enter(name: str) -> None:
    fd = os.open(os.path.join(_NETNS_DIR, name), os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NamespaceThread:
    """One worker thread living in network namespace `name` (as made by `ip netns add`)."""

    def __init__(self, name: str) -> None:
        if not os.path.exists(os.path.join(_NETNS_DIR, name)):
            raise LabError(f"network namespace {name} does not exist ({_NETNS_DIR}/{name})")
        self.name = name
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{name}", initializer=_enter, initargs=(name,)
        )
        # Fail here, not at the first call, when the namespace does not exist.
        self.call(lambda: None)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run fn(*args, **kwargs) inside the namespace and return (or raise) its result."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NamespaceThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
