"""The machine end of WireGuard over gRPC: a local UDP relay between `siderolinktun` and the
server's `CreateStream`.

The machine's WireGuard device is a separate process (or the kernel), so the relay is a UDP
socket on loopback that the agent configures as the device's peer endpoint. Whatever the
device sends there goes onto the stream; whatever arrives on the stream is sent back to the
device from that socket, so to the device the server simply lives at `127.0.0.1:<relay>`.

Behaviour (docs/compatibility.md): one channel to the same host and TLS choice as the API; every
stream carries `x-siderolink-ipv6-addr`; datagrams wait in a bounded queue (100, drop oldest)
while no stream is open (with one open, a full queue pauses reading the relay socket
instead, see pump.py); a broken stream is reopened after a random 5-10 s; `peer not
allowed` and `peer replaced` are fatal: the client stops and reports, and the agent's
lifecycle provisions again. A stream that stays silent while we keep sending is reopened (a
TCP connection can die without either end being told).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc

from gatekeeper.config.siderolink import ApiEndpoint
from gatekeeper.pb.siderolink import wireguard_pb2, wireguard_pb2_grpc
from gatekeeper.tunnel import batching
from gatekeeper.tunnel.errors import is_fatal
from gatekeeper.tunnel.guard import Verdict, check_datagram
from gatekeeper.tunnel.header import PEER_HEADER, canonical_peer
from gatekeeper.tunnel.pump import Pump, has_room, widen_buffers
from gatekeeper.tunnel.queue import DEFAULT_QUEUE_SIZE, DropOldestQueue

log = logging.getLogger(__name__)

RETRY_DELAY = (5.0, 10.0)
# Reopen a stream that has returned nothing for this long although we sent datagrams. Longer
# than a WireGuard handshake retry cycle and than the agent's probe interval, so a healthy
# link (which answers probes) never trips it.
STALE_AFTER = 40.0
# How long a new stream waits for the server's headers before its first write.
FIRST_ANSWER_WAIT = 0.25
_READ_BUDGET = 256
_RECV_SIZE = 65535


class TunnelError(RuntimeError):
    """The relay cannot start (the local socket); the message says why."""


@dataclass(frozen=True)
class TunnelStatus:
    """What the agent shows about the tunnel; `state` is connecting/open/retrying/failed/closed."""

    state: str
    detail: str = ""
    batching: bool = False
    sent: int = 0
    received: int = 0
    dropped: int = 0
    streams: int = 0


class TunnelClient:
    def __init__(
        self,
        api: ApiEndpoint,
        header: str,
        *,
        on_status: Callable[[TunnelStatus], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        retry_delay: tuple[float, float] = RETRY_DELAY,
        stale_after: float = STALE_AFTER,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batching_on: bool = True,
        bind_host: str = "127.0.0.1",
        device_port: int | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.api = api
        self.header = canonical_peer(header)
        self.on_status = on_status
        self.on_fatal = on_fatal
        self.retry_delay = retry_delay
        self.stale_after = stale_after
        self.batching_on = batching_on
        self.bind_host = bind_host
        # The device's listen port when it is fixed: datagrams from any other local port are
        # ignored, so no other process can make the relay answer to it instead.
        self.device_port = device_port or None
        self.credentials = credentials
        self._state = TunnelStatus("closed")
        self._sent = 0
        self._received = 0
        self._queue: DropOldestQueue[bytes] = DropOldestQueue(queue_size)
        self._pump: Pump | None = None
        self._paused = False
        self._sock: socket.socket | None = None
        self._device: tuple[Any, ...] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._batch_bytes = batching.MAX_BATCH_BYTES

    @property
    def local_endpoint(self) -> str:
        if self._sock is None:
            raise TunnelError("the tunnel relay is not started")
        host, port = self._sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> str:
        """Bind the relay socket, start the stream loop; the device's peer endpoint."""
        if self._sock is not None:
            return self.local_endpoint
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            widen_buffers(sock)
            sock.bind((self.bind_host, 0))
        except OSError as exc:
            sock.close()
            raise TunnelError(f"cannot bind the tunnel relay on {self.bind_host}: {exc}") from None
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)
        if self.api.tls:
            creds = self.credentials or grpc.ssl_channel_credentials()
            self._channel = grpc.aio.secure_channel(self.api.target(), creds)
        else:
            self._channel = grpc.aio.insecure_channel(self.api.target())
        self._task = asyncio.create_task(self._run())
        return self.local_endpoint

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
        if self._state.state != "failed":
            self._set(state="closed", detail="")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- status -------------------------------------------------------------------------

    @property
    def status(self) -> TunnelStatus:
        return replace(
            self._state, sent=self._sent, received=self._received, dropped=self._queue.dropped
        )

    def _set(self, **changes: Any) -> None:
        self._state = replace(self._state, **changes)
        if self.on_status is not None:
            self.on_status(self.status)

    # -- datagrams from the device ------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        pump = self._pump
        # With a stream open, read no more than the queue has room for and leave the rest in
        # the socket's buffer (see pump.py): reading 256 into a queue of 100 would throw the
        # oldest away at once, which TCP inside the tunnel pays for. Without a stream the
        # queue keeps the newest datagrams and drops the oldest (docs/compatibility.md).
        budget = _READ_BUDGET if pump is None else self._queue.maxsize - len(self._queue)
        got = 0
        for _ in range(budget):
            try:
                data, source = sock.recvfrom(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError:
                continue
            # Only a local process can reach this socket; the latest sender is the device
            # (with a random listen port, its port changes when the link is recreated).
            if self.device_port is not None and source[1] != self.device_port:
                continue
            self._device = source
            self._queue.push(data)
            got += 1
        if pump is not None and len(self._queue) >= self._queue.maxsize:
            self._pause_reading()
        if got and (not self._last_tx or self._last_tx <= self._last_rx):
            self._last_tx = time.monotonic()
        if pump is not None:
            pump.kick()

    def _pause_reading(self) -> None:
        if self._sock is not None and self._loop is not None and not self._paused:
            self._loop.remove_reader(self._sock.fileno())
            self._paused = True

    def _on_space(self) -> None:
        if has_room(self._queue):
            self._resume_reading()

    def _resume_reading(self) -> None:
        if self._sock is not None and self._loop is not None and self._paused:
            self._paused = False
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _to_device(self, datagrams: list[bytes]) -> None:
        sock, device = self._sock, self._device
        if sock is None or device is None:
            return
        for d in datagrams:
            if check_datagram(d) is not Verdict.OK:
                continue
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                sock.sendto(d, device)

    # -- streams ------------------------------------------------------------------------

    async def _run(self) -> None:
        delay_rng = random.Random()
        while True:
            self._set(state="connecting", detail=self.api.target(), batching=False)
            try:
                code, details = await self._one_stream()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive one odd failure
                log.exception("tunnel stream failed unexpectedly")
                code, details = "UNKNOWN", f"unexpected error: {exc}"
            first = (details or "").splitlines()[:1]
            text = f"{code}: {first[0]}" if first else code
            if is_fatal(code, details):
                message = f"tunnel stream to {self.api.target()} refused: {text}"
                log.warning("%s; not reopening it", message)
                self._set(state="failed", detail=message, batching=False)
                if self.on_fatal is not None:
                    self.on_fatal(message)
                return
            delay = delay_rng.uniform(*self.retry_delay)
            log.info("tunnel stream ended (%s); reopening in %.1f s", text, delay)
            self._set(state="retrying", detail=f"{text}; reopening in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _one_stream(self) -> tuple[str, str | None]:
        """Run one stream until it ends; its status (code name, details)."""
        assert self._channel is not None
        stub = wireguard_pb2_grpc.WireGuardOverGRPCServiceStub(self._channel)  # type: ignore[no-untyped-call]
        metadata: list[tuple[str, str]] = [(PEER_HEADER, self.header)]
        if self.batching_on:
            metadata.extend(batching.offer())
        call = stub.CreateStream(metadata=tuple(metadata))
        self._last_rx = self._last_tx = 0.0
        self._set(streams=self._state.streams + 1)
        negotiated = asyncio.Event()
        answered = asyncio.Event()
        tasks = {
            asyncio.create_task(self._negotiate(call, negotiated, answered)),
            asyncio.create_task(self._send(call, negotiated, answered)),
            asyncio.create_task(self._receive(call)),
            asyncio.create_task(self._watch_stale()),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            errors = [task.exception() for task in done]
            for exc in errors:
                if isinstance(exc, _Ended):
                    return exc.code, exc.details
            if any(isinstance(exc, grpc.aio.AioRpcError) for exc in errors):
                # A write into a call the server just refused fails with a generic error;
                # the call's own status says what really happened.
                with contextlib.suppress(asyncio.TimeoutError):
                    code = await asyncio.wait_for(call.code(), 2.0)
                    return code.name, await call.details()
            for exc in errors:
                if isinstance(exc, grpc.aio.AioRpcError):
                    return exc.code().name, exc.details()
                if exc is not None:
                    raise exc
            return "OK", "stream ended"
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task
            call.cancel()

    async def _negotiate(
        self, call: Any, negotiated: asyncio.Event, answered: asyncio.Event
    ) -> None:
        metadata = await call.initial_metadata()
        answered.set()
        if call.done():
            # A refusal comes as trailers only; the receiving task reports it.
            await asyncio.Event().wait()
        on = self.batching_on and batching.announced(metadata)
        if on:
            self._batch_bytes = batching.batch_bytes(metadata)
            negotiated.set()
        self._set(state="open", detail=self.api.target(), batching=on)
        log.info("tunnel stream open to %s%s", self.api.target(), " (batching)" if on else "")
        await asyncio.Event().wait()  # stay pending: only errors and the other tasks end a stream

    async def _send(self, call: Any, negotiated: asyncio.Event, answered: asyncio.Event) -> None:
        # A Gatekeeper server answers (accepts or refuses) at once; a reference server sends
        # its headers only with its first datagram, so do not wait for it long. Writing into
        # a call that is being refused loses the refusal's status (grpc reports INTERNAL).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(answered.wait(), FIRST_ANSWER_WAIT)
        if call.done():
            await asyncio.Event().wait()  # refused: the receiving task reports why

        async def write(data: bytes, batch: list[bytes]) -> None:
            await call.write(wireguard_pb2.PeerPacket(Data=data, batch=batch))
            self._sent += (1 if data else 0) + len(batch)

        pump = Pump(
            self._queue,
            write,
            batching_on=negotiated.is_set,
            max_bytes=lambda: self._batch_bytes,
            on_space=self._on_space,
        )
        self._pump = pump
        try:
            pump.kick()  # what queued up while no stream was open
            await pump.wait()
        finally:
            self._pump = None
            pump.close(abandon=True)
            self._resume_reading()

    async def _receive(self, call: Any) -> None:
        while True:
            packet = await call.read()
            if packet is grpc.aio.EOF:  # type: ignore[attr-defined]
                code = await call.code()
                raise _Ended(code.name, await call.details() or "stream ended by the server")
            # The server batches only towards a client that offered, so accept what we offered.
            got, _refused = batching.datagrams(packet.Data, packet.batch, batching=self.batching_on)
            self._last_rx = time.monotonic()
            self._received += len(got)
            self._to_device(got)

    async def _watch_stale(self) -> None:
        period = max(self.stale_after / 4, 0.05)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            waiting_since = self._last_tx if self._last_tx > self._last_rx else 0.0
            if waiting_since and now - waiting_since >= self.stale_after:
                raise _Ended("OK", f"nothing came back for {now - waiting_since:.0f} s")


class _Ended(Exception):
    """A stream ended at its end of data (with its status), or was judged stale."""

    def __init__(self, code: str, details: str | None) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
