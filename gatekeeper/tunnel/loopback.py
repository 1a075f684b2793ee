"""A tunnel server on loopback, in its own thread, for tests and benchmarks.

A real `TunnelHub` and `TunnelService` on a real gRPC server; in place of the WireGuard device
a UDP socket that echoes each datagram back to where it came from (the peer's relay socket),
so whatever a stream sends comes back on that stream. Callers use it from plain synchronous
code: `call()` runs a function on the server's loop and returns its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc

from gatekeeper.tunnel.pump import widen_buffers
from gatekeeper.tunnel.server import TunnelHub, add_to_server

T = TypeVar("T")


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.seen = 0
        self.enabled = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # A device takes a window's burst from the hub without losing any; so must this one.
        widen_buffers(transport.get_extra_info("socket"))

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.seen += 1
        if self.enabled and self.transport is not None:
            self.transport.sendto(data, addr)


class LoopbackTunnelServer:
    """`start()` / `stop()` (or a `with` block); `target` is the gRPC address."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **hub_options: Any) -> None:
        self.host = host
        self.port = port
        self.hub_options = hub_options
        self.hub: TunnelHub | None = None
        self.echo = _Echo()
        self._server: grpc.aio.Server | None = None
        self._echo_transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> LoopbackTunnelServer:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: self.echo, local_addr=("127.0.0.1", 0)
        )
        self._echo_transport = transport
        device_port = transport.get_extra_info("sockname")[1]
        self.hub = TunnelHub(device_port, **self.hub_options)
        await self._serve()

    async def _serve(self) -> None:
        assert self.hub is not None
        server = grpc.aio.server()
        add_to_server(self.hub, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server

    def run(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the server's loop (where the hub lives) and return its result."""

        async def invoke() -> T:
            return fn(*args)

        result: T = self.run(invoke())
        return result

    def allow(self, virtual: str) -> str:
        assert self.hub is not None
        return self.call(self.hub.allow, virtual)

    def revoke(self, virtual: str) -> None:
        assert self.hub is not None
        self.call(self.hub.revoke, virtual)

    def stop_grpc(self) -> None:
        """Stop only the gRPC server (streams break); `restart_grpc()` serves again."""
        if self._server is not None:
            self.run(self._server.stop(grace=None))
            self._server = None

    def restart_grpc(self) -> None:
        self.run(self._serve())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.stop_grpc()
        if self.hub is not None:
            self.call(self.hub.close)
        if self._echo_transport is not None:
            self.call(self._echo_transport.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> LoopbackTunnelServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
