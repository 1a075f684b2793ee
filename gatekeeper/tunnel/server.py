"""The server end of WireGuard over gRPC: `CreateStream` and one UDP relay socket per peer.

The server's WireGuard device is another process (wireguard-go) or the kernel, so packets
cannot be handed to it in memory. Instead every admitted tunnel peer gets its own UDP socket
on loopback, connected to the device's listen port. Datagrams that arrive on the peer's
stream are sent from that socket, so the device sees them coming from `127.0.0.1:<relay>` and
takes that as the peer's endpoint (the Provisioner also sets it up front); whatever the device
sends to that endpoint lands on the same socket and goes onto the peer's stream. The socket
is connected, so only the device's own datagrams are read from it.

Fairness: everything runs on one event loop. Each stream reads a message, hands its datagrams
to the device and yields; a stream over its rate waits (HTTP/2 flow control then slows its
sender); each peer's outgoing queue is bounded: while its stream is slow to take datagrams
the hub stops reading that peer's relay socket (the kernel buffer then holds, and at worst
drops, the newest), so a machine that reads slowly loses its own packets and holds up nobody
else. Writes start from the relay socket's readable callback (pump.py), so a datagram to an
idle peer waits for no task wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from gatekeeper.pb.siderolink import wireguard_pb2, wireguard_pb2_grpc
from gatekeeper.throttle import LogThrottle
from gatekeeper.tunnel import batching
from gatekeeper.tunnel.errors import PEER_NOT_ALLOWED, PEER_REPLACED
from gatekeeper.tunnel.guard import DEFAULT_MAX_DATAGRAM, Cut, StreamGuard, TokenBucket
from gatekeeper.tunnel.header import HeaderError, canonical_peer, header_from_metadata
from gatekeeper.tunnel.pump import Pump, has_room, widen_buffers
from gatekeeper.tunnel.queue import DEFAULT_QUEUE_SIZE, DropOldestQueue

log = logging.getLogger(__name__)

# Per peer, in datagrams: about 1 Gbit/s of full-size packets, far above what one machine's
# management link needs, and a ceiling on what a flooding stream can make us do.
DEFAULT_RATE = 100_000.0
DEFAULT_BURST = 2_000.0
# Datagrams read from one relay socket per wake-up, so one busy device peer cannot hold the
# loop while other streams wait.
_READ_BUDGET = 256
_RECV_SIZE = 65535

# The gRPC port's message limit when it carries the tunnel too, and the datagram bytes per
# message announced to clients (room left for framing): about 46 full-size datagrams.
TUNNEL_MESSAGE_LIMIT = 64 << 10
TUNNEL_BATCH_BYTES = 60 << 10

_REPLACED = "replaced"
_REVOKED = "revoked"
_CLIENT_DONE = "client-done"
_CUT = "cut"
_STATUS = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class _Stream:
    """One CreateStream call attached to a peer; `end()` tells its writer to stop."""

    def __init__(self, batching_on: bool, who: str) -> None:
        self.batching = batching_on
        self.who = who
        self.reason: str | None = None
        self.cut: Cut | None = None
        self.pump: Pump | None = None

    def end(self, reason: str, cut: Cut | None = None) -> None:
        if self.reason is None:
            self.reason = reason
            self.cut = cut
        if self.pump is not None:
            self.pump.close()


@dataclass(eq=False)
class _Peer:
    virtual: str
    sock: socket.socket
    endpoint: str
    outgoing: DropOldestQueue[bytes]
    stream: _Stream | None = None
    to_device: int = 0
    from_device: int = 0
    no_stream_drops: int = 0
    streams: int = 0
    closed: bool = field(default=False)
    paused: bool = False


@dataclass(frozen=True)
class PeerInfo:
    virtual: str
    endpoint: str
    connected: bool
    batching: bool
    to_device: int
    from_device: int
    dropped: int
    streams: int


class TunnelHub:
    """Admitted tunnel peers, their relay sockets and their streams.

    Create it inside the running event loop that serves gRPC; `allow`/`revoke` are called
    from that loop (the Provisioner runs in the Provision handler).
    """

    def __init__(
        self,
        device_port: int,
        *,
        device_host: str = "127.0.0.1",
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        batch_bytes: int = batching.MAX_BATCH_BYTES,
    ) -> None:
        if not 0 < device_port <= 65535:
            raise ValueError(f"device port {device_port} is out of range 1-65535")
        self.device = (device_host, device_port)
        self.queue_size = queue_size
        self.max_datagram = max_datagram
        self.rate = rate
        self.burst = burst
        # Datagram bytes per message; it must fit the gRPC server's message size limit.
        self.batch_bytes = batch_bytes
        self._loop = asyncio.get_running_loop()
        self._family = socket.AF_INET6 if ":" in device_host else socket.AF_INET
        self._peers: dict[str, _Peer] = {}

    # -- the Provisioner's side ---------------------------------------------------------

    def allow(self, virtual_addr_port: str) -> str:
        virtual = canonical_peer(virtual_addr_port)
        peer = self._peers.get(virtual)
        if peer is not None:
            return peer.endpoint
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            widen_buffers(sock)
            sock.bind((self.device[0], 0))
            sock.connect(self.device)
            host, port = sock.getsockname()[:2]
        except OSError:
            sock.close()
            raise
        endpoint = f"[{host}]:{port}" if self._family == socket.AF_INET6 else f"{host}:{port}"
        peer = _Peer(virtual, sock, endpoint, DropOldestQueue(self.queue_size))
        self._loop.add_reader(sock.fileno(), self._on_readable, peer)
        self._peers[virtual] = peer
        log.info("tunnel peer %s admitted, relay %s", virtual, endpoint)
        return endpoint

    def revoke(self, virtual_addr_port: str) -> None:
        try:
            virtual = canonical_peer(virtual_addr_port)
        except HeaderError:
            return
        peer = self._peers.pop(virtual, None)
        if peer is None:
            return
        self._close_peer(peer)
        log.info("tunnel peer %s removed", virtual)

    def close(self) -> None:
        for peer in list(self._peers.values()):
            self._close_peer(peer)
        self._peers.clear()

    def _close_peer(self, peer: _Peer) -> None:
        peer.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(peer.sock.fileno())
        peer.sock.close()
        peer.outgoing.clear()
        if peer.stream is not None:
            peer.stream.end(_REVOKED)

    # -- observing ----------------------------------------------------------------------

    def allowed(self) -> list[str]:
        return sorted(self._peers)

    def stream_source(self, virtual_addr_port: str) -> str | None:
        """The gRPC peer (`ipv6:[addr]:port`) whose stream carries this tunnel peer now."""
        try:
            peer = self._peers.get(canonical_peer(virtual_addr_port))
        except HeaderError:
            return None
        return peer.stream.who if peer is not None and peer.stream is not None else None

    def info(self, virtual_addr_port: str) -> PeerInfo | None:
        peer = self._peers.get(canonical_peer(virtual_addr_port))
        if peer is None:
            return None
        return PeerInfo(
            virtual=peer.virtual,
            endpoint=peer.endpoint,
            connected=peer.stream is not None,
            batching=bool(peer.stream and peer.stream.batching),
            to_device=peer.to_device,
            from_device=peer.from_device,
            dropped=peer.outgoing.dropped + peer.no_stream_drops,
            streams=peer.streams,
        )

    # -- datagrams from the device ------------------------------------------------------

    def _on_readable(self, peer: _Peer) -> None:
        stream = peer.stream
        pump = stream.pump if stream is not None else None
        queue = peer.outgoing
        # With a pump, read only what the queue has room for; the rest waits in the socket's
        # buffer until the pump takes some (pump.py: backpressure instead of drop-oldest).
        budget = _READ_BUDGET if pump is None else queue.maxsize - len(queue)
        for _ in range(budget):
            try:
                data = peer.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError:
                # ECONNREFUSED: an earlier datagram found no device listening. Keep reading.
                continue
            peer.from_device += 1
            if stream is None:
                peer.no_stream_drops += 1
            else:
                queue.push(data)
        if pump is not None:
            if len(queue) >= queue.maxsize:
                self._pause(peer)
            pump.kick()

    def _pause(self, peer: _Peer) -> None:
        if not peer.paused and not peer.closed:
            self._loop.remove_reader(peer.sock.fileno())
            peer.paused = True

    def resume(self, peer: _Peer) -> None:
        """Read the peer's relay socket again (after `_pause`), unless it is closed."""
        if peer.paused and not peer.closed:
            peer.paused = False
            self._loop.add_reader(peer.sock.fileno(), self._on_readable, peer)

    # -- streams ------------------------------------------------------------------------

    def attach(self, virtual: str, batching_on: bool, who: str) -> tuple[_Peer, _Stream] | None:
        peer = self._peers.get(virtual)
        if peer is None:
            return None
        stream = _Stream(batching_on, who)
        old, peer.stream = peer.stream, stream
        peer.streams += 1
        if old is not None:
            log.info("tunnel peer %s: stream from %s replaces %s", virtual, who, old.who)
            old.end(_REPLACED)
        return peer, stream

    def detach(self, peer: _Peer, stream: _Stream) -> None:
        if peer.stream is stream:
            peer.stream = None

    def to_device(self, peer: _Peer, datagrams: list[bytes]) -> None:
        if peer.closed:
            return
        sock = peer.sock
        for d in datagrams:
            try:
                sock.send(d)
            except (BlockingIOError, ConnectionRefusedError):
                # Like any UDP path: a full buffer or an absent device loses the datagram.
                continue
            except OSError:
                return
            peer.to_device += 1


# Refused-stream warnings per source address and minute; the rest are counted and the next
# line that is written says how many were left out (3,000 refusals are not 3,000 lines).
REFUSAL_LOGS_PER_MINUTE = 5


def _source(who: str) -> str:
    """The address part of a gRPC peer string (`ipv6:[a]:p` -> `ipv6:[a]`), for throttling."""
    return who.rpartition(":")[0] or who


class TunnelService(wireguard_pb2_grpc.WireGuardOverGRPCServiceServicer):
    """`/sidero.link.WireGuardOverGRPCService/CreateStream` over a `TunnelHub`."""

    def __init__(self, hub: TunnelHub) -> None:
        self.hub = hub
        self._refusals = LogThrottle(REFUSAL_LOGS_PER_MINUTE, 60.0)

    def _log_refusal(self, who: str, message: str, *args: object) -> None:
        allowed, suppressed = self._refusals.allow(_source(who), asyncio.get_running_loop().time())
        if allowed:
            more = f" ({suppressed} more refusals from there not logged)" if suppressed else ""
            log.warning(message + "%s", *args, more)

    async def CreateStream(
        self,
        request_iterator: AsyncIterator[wireguard_pb2.PeerPacket],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        metadata = context.invocation_metadata()
        who = context.peer()
        try:
            virtual = canonical_peer(header_from_metadata(metadata))
        except HeaderError as exc:
            self._log_refusal(who, "tunnel stream from %s refused: %s", who, exc)
            # The reference returns a plain Go error here (UNKNOWN on the wire); we say what is
            # wrong with a code a client can act on. A deliberate difference, see
            # docs/compatibility.md.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        attached = self.hub.attach(virtual, batching.announced(metadata), who)
        if attached is None:
            self._log_refusal(
                who, "tunnel stream from %s for %s refused: not a tunnel peer", who, virtual
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, PEER_NOT_ALLOWED[1])
        assert attached is not None
        peer, stream = attached
        log.info(
            "tunnel peer %s: stream open from %s%s",
            virtual,
            who,
            " (batching)" if stream.batching else "",
        )
        reader = asyncio.create_task(self._read(peer, stream, request_iterator))
        try:
            # Headers at once (with the batching echo when offered): the client learns that
            # the stream was accepted before it writes into it.
            await context.send_initial_metadata(batching.answer(metadata, self.hub.batch_bytes))
            await self._write(peer, stream, context)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.hub.detach(peer, stream)
        log.info("tunnel peer %s: stream from %s ended (%s)", virtual, who, stream.reason)
        if stream.reason == _REPLACED:
            await context.abort(grpc.StatusCode.ABORTED, PEER_REPLACED[1])
        if stream.reason == _CUT and stream.cut is not None:
            log.warning("tunnel peer %s: stream from %s cut off: %s", virtual, who, stream.cut)
            await context.abort(_STATUS[stream.cut.code], stream.cut.message)
        # Revoked, or the client half-closed: a clean end (status OK).

    async def _write(
        self, peer: _Peer, stream: _Stream, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        async def write(data: bytes, batch: list[bytes]) -> None:
            await context.write(wireguard_pb2.PeerPacket(Data=data, batch=batch))

        hub = self.hub

        def on_space() -> None:
            if has_room(peer.outgoing):
                hub.resume(peer)

        pump = Pump(
            peer.outgoing,
            write,
            batching_on=lambda: stream.batching,
            max_bytes=lambda: hub.batch_bytes,
            on_space=on_space,
        )
        stream.pump = pump
        if stream.reason is not None:
            pump.close()
        try:
            pump.kick()
            await pump.wait()
        finally:
            stream.pump = None
            pump.close(abandon=True)
            hub.resume(peer)

    async def _read(
        self,
        peer: _Peer,
        stream: _Stream,
        packets: AsyncIterator[wireguard_pb2.PeerPacket],
    ) -> None:
        hub = self.hub
        guard = StreamGuard(max_datagram=hub.max_datagram)
        bucket = TokenBucket(hub.rate, hub.burst)
        loop = asyncio.get_running_loop()
        try:
            async for packet in packets:
                got, refused = batching.datagrams(
                    packet.Data, packet.batch, batching=stream.batching
                )
                good, cut = guard.admit(got)
                cut = cut or guard.refuse(refused)
                hub.to_device(peer, good)
                if cut is not None:
                    stream.end(_CUT, cut)
                    return
                wait = bucket.delay(len(good), loop.time())
                if wait > 0:
                    await asyncio.sleep(wait)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the transport broke; the writer must not wait forever
            log.debug("tunnel peer %s: read failed: %s", peer.virtual, exc)
        stream.end(_CLIENT_DONE)


def add_to_server(hub: TunnelHub, server: grpc.aio.Server) -> TunnelService:
    service = TunnelService(hub)
    wireguard_pb2_grpc.add_WireGuardOverGRPCServiceServicer_to_server(  # type: ignore[no-untyped-call]
        service, server
    )
    return service


def server_options(options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """gRPC server options whose message limits (if set) are raised to fit tunnel batches."""
    raised = {"grpc.max_receive_message_length", "grpc.max_send_message_length"}
    return [(k, max(int(v), TUNNEL_MESSAGE_LIMIT) if k in raised else v) for k, v in options]
