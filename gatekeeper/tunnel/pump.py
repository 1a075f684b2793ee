"""Moves a tunnel end's queued datagrams onto its gRPC stream, one write at a time.

Latency: a datagram that reaches an idle relay is written from inside the socket's readable
callback, in the same loop iteration, with no task wake-up in between (`start_now`). gRPC
then sends it from this thread. Under load the same write loop keeps going: whatever queued
up while a write was in flight becomes the next message (batching.take), so nothing ever
waits to fill a batch.

Backpressure: `on_space` tells the owner that the queue has room again, so an owner that
stopped reading its UDP socket while the queue was full can resume (`has_room`: once half of
it is free, so that a busy link does not pause and resume the reader at every message).
Datagrams that arrive meanwhile wait in the socket's kernel buffer instead of pushing queued
ones out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

from gatekeeper.tunnel import batching
from gatekeeper.tunnel.queue import DropOldestQueue

T = TypeVar("T")

# Socket buffers of a relay socket, each way. The default (about 200 KiB, some 90 full-size
# datagrams) overflows while the loop is busy with a gRPC write and wireguard-go sends a
# window's worth at once. Linux doubles what is asked: 2 MiB is some 16 ms of a gigabit link,
# enough for bursts, not so much that TCP inside the tunnel fills a long standing queue.
RELAY_BUFFER = 1 << 20
# Linux's values; Python's socket module does not name them.
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33

Write = Callable[[bytes, list[bytes]], Awaitable[None]]


def widen_buffers(sock: socket.socket, size: int = RELAY_BUFFER) -> None:
    """Ask for `size`-byte socket buffers: past the sysctl ceiling when root (the agent and
    the server are), else as much as the ceiling allows."""
    for forced, plain in (
        (_SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (_SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


def has_room(queue: DropOldestQueue[bytes]) -> bool:
    """Whether a reader paused on this full queue should read again."""
    return len(queue) <= queue.maxsize // 2


class _Resume:
    """Awaiting this finishes a coroutine that already ran up to its first suspension."""

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        value = self._first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancellation included: hand it to the coroutine
                try:
                    value = self._coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = self._coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish(coro: Coroutine[Any, Any, T], first: Any) -> T:
    result: T = await _Resume(coro, first)
    return result


def start_now(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run `coro` at once up to its first wait, then as a task.

    `asyncio.create_task` would start it only in the next loop iteration (Python 3.11 has no
    eager tasks): for a datagram that is one more wake-up on its path.
    """
    loop = asyncio.get_running_loop()
    try:
        first = coro.send(None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except BaseException as exc:
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    return loop.create_task(_finish(coro, first))


class Pump:
    """Writes `queue` to one stream through `write(data, batch)` until closed or a write fails."""

    def __init__(
        self,
        queue: DropOldestQueue[bytes],
        write: Write,
        *,
        batching_on: Callable[[], bool],
        max_bytes: Callable[[], int],
        on_space: Callable[[], None] | None = None,
    ) -> None:
        self._queue = queue
        self._write = write
        self._batching_on = batching_on
        self._max_bytes = max_bytes
        self._on_space = on_space
        self._writing: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing = False
        self.sent = 0

    def kick(self) -> None:
        """Start writing now, unless a write is in flight (it takes what is queued next)."""
        if self._writing is not None or self._closing or not self._queue:
            return
        self._writing = start_now(self._drain())
        self._writing.add_done_callback(self._drained)

    async def _drain(self) -> None:
        queue = self._queue
        while queue and not self._closing:
            on = self._batching_on()
            items = batching.take(queue, batching=on, max_bytes=self._max_bytes())
            if self._on_space is not None:
                self._on_space()
            data, batch = batching.fields(items, batching=on)
            await self._write(data, batch)
            self.sent += len(items)

    def _drained(self, fut: asyncio.Future[None]) -> None:
        self._writing = None
        if fut.cancelled():
            self._end(None)
            return
        exc = fut.exception()
        if exc is not None:
            self._end(exc)
            return
        if self._closing:
            self._end(None)
        else:
            # Datagrams may have been queued after the loop's last look and before this ran.
            self.kick()

    def _end(self, exc: BaseException | None) -> None:
        if self._ended.done():
            return
        if exc is None:
            self._ended.set_result(None)
        else:
            self._ended.set_exception(exc)
            self._ended.exception()  # whoever waits sees it; nobody waiting is no error to log

    async def wait(self) -> None:
        """Until the pump is closed (and its last write done); raises a failed write's error."""
        await asyncio.shield(self._ended)

    def close(self, *, abandon: bool = False) -> None:
        """Stop after the write in flight, or at once and cancelling it (`abandon`)."""
        self._closing = True
        if self._writing is None:
            self._end(None)
        elif abandon:
            self._writing.cancel()
