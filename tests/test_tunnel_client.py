"""The machine's relay (TunnelClient) against the real TunnelHub on loopback: datagrams both
ways, batching negotiated, fatal endings reported, a broken stream reopened."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from gatekeeper.config.siderolink import ApiEndpoint
from gatekeeper.tunnel.client import TunnelClient, TunnelStatus
from gatekeeper.tunnel.loopback import LoopbackTunnelServer

PEER = "[fdae:41e4:649b:9304::c1]:50889"
FAST_RETRY = (0.1, 0.2)


def datagram(n: int) -> bytes:
    return b"\x04\0\0\0" + bytes([n % 256]) * 44


@pytest.fixture
def server() -> Iterator[LoopbackTunnelServer]:
    with LoopbackTunnelServer() as srv:
        srv.allow(PEER)
        yield srv


class Device:
    """Stands in for the machine's WireGuard device: a UDP socket talking to the relay."""

    def __init__(self, relay: str) -> None:
        host, port = relay.rsplit(":", 1)
        self.relay = (host, int(port))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.relay)

    async def recv(self, timeout: float = 5) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 65535), timeout)

    def close(self) -> None:
        self.sock.close()


def client_for(server: LoopbackTunnelServer, header: str = PEER, **kw: object) -> TunnelClient:
    api = ApiEndpoint(host="127.0.0.1", port=server.port, tls=False)
    return TunnelClient(api, header, retry_delay=FAST_RETRY, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def running(server: LoopbackTunnelServer) -> AsyncIterator[tuple[TunnelClient, Device]]:
    client = client_for(server)
    relay = await client.start()
    device = Device(relay)
    try:
        yield client, device
    finally:
        device.close()
        await client.close()


async def wait_for(predicate: object, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_relay_carries_datagrams_both_ways_and_negotiates_batching(
    running: tuple[TunnelClient, Device],
) -> None:
    client, device = running
    assert client.local_endpoint.startswith("127.0.0.1:")
    device.send(datagram(1))
    assert await device.recv() == datagram(1)
    await wait_for(lambda: client.status.state == "open")
    assert client.status.batching
    for i in range(50):
        device.send(datagram(i))
    got = [await device.recv() for _ in range(50)]
    assert got == [datagram(i) for i in range(50)]  # in order, none lost
    assert client.status.sent == 51 and client.status.received == 51


def numbered(n: int) -> bytes:
    """A transport-shaped datagram that carries its sequence number."""
    return b"\x04\0\0\0" + n.to_bytes(4, "big") + bytes(40)


async def test_a_single_datagram_through_an_idle_relay_arrives(
    running: tuple[TunnelClient, Device],
) -> None:
    client, device = running
    device.send(datagram(1))
    assert await device.recv() == datagram(1)
    await asyncio.sleep(0.2)  # nothing in flight any more: the relay and the hub are idle
    device.send(datagram(2))
    assert await device.recv() == datagram(2)
    assert client.status.sent == 2 and client.status.received == 2


async def test_a_burst_ten_times_the_queue_arrives_complete_and_in_order(
    server: LoopbackTunnelServer, running: tuple[TunnelClient, Device]
) -> None:
    # Both ends read no more than their 100-datagram queue has room for and leave the rest
    # in the socket's buffer, so a burst from the device is delayed, not thinned out.
    client, device = running
    device.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: hold the echoes
    device.send(datagram(0))
    assert await device.recv() == datagram(0)
    for i in range(1000):
        device.send(numbered(i))
    got = [await device.recv() for _ in range(1000)]
    assert got == [numbered(i) for i in range(1000)]
    assert client.status.dropped == 0
    assert server.hub is not None
    info = server.call(server.hub.info, PEER)
    assert info is not None and info.dropped == 0


async def test_without_batching_the_relay_speaks_the_reference_format(
    server: LoopbackTunnelServer,
) -> None:
    client = client_for(server, batching_on=False)
    device = Device(await client.start())
    try:
        for i in range(20):
            device.send(datagram(i))
        assert [await device.recv() for _ in range(20)] == [datagram(i) for i in range(20)]
        assert client.status.state == "open" and not client.status.batching
        assert server.hub is not None
        info = server.call(server.hub.info, PEER)
        assert info is not None and not info.batching
    finally:
        device.close()
        await client.close()


async def test_unknown_peer_is_fatal_and_reported(server: LoopbackTunnelServer) -> None:
    fatal: list[str] = []
    states: list[TunnelStatus] = []
    client = client_for(
        server, "[fdae:41e4:649b:9304::99]:50889", on_fatal=fatal.append, on_status=states.append
    )
    device = Device(await client.start())
    try:
        device.send(datagram(1))
        await wait_for(lambda: bool(fatal))
        assert "PERMISSION_DENIED: peer not allowed" in fatal[0]
        assert client.status.state == "failed" and not client.running
        await asyncio.sleep(0.4)  # longer than the retry delay: no second attempt
        assert client.status.streams == 1
        assert [s.state for s in states if s.state != "connecting"] == ["failed"]
    finally:
        device.close()
        await client.close()
    assert client.status.state == "failed"  # close() keeps the reason visible


async def test_replaced_stream_is_fatal_for_the_old_relay(server: LoopbackTunnelServer) -> None:
    fatal: list[str] = []
    old = client_for(server, on_fatal=fatal.append)
    new = client_for(server)
    old_dev = Device(await old.start())
    new_dev: Device | None = None
    try:
        old_dev.send(datagram(1))
        assert await old_dev.recv() == datagram(1)
        new_dev = Device(await new.start())
        new_dev.send(datagram(2))
        assert await new_dev.recv() == datagram(2)
        await wait_for(lambda: bool(fatal))
        assert "ABORTED: peer replaced" in fatal[0]
        await asyncio.sleep(0.4)
        new_dev.send(datagram(3))
        assert await new_dev.recv() == datagram(3)  # the old one did not steal it back
    finally:
        old_dev.close()
        if new_dev is not None:
            new_dev.close()
        await old.close()
        await new.close()


async def test_broken_stream_is_reopened_and_queued_datagrams_follow(
    server: LoopbackTunnelServer, running: tuple[TunnelClient, Device]
) -> None:
    client, device = running
    device.send(datagram(1))
    assert await device.recv() == datagram(1)
    await asyncio.to_thread(server.stop_grpc)
    await wait_for(lambda: client.status.state in ("retrying", "connecting"))
    for i in range(150):  # while no stream is open: bounded queue, oldest dropped
        device.send(datagram(i))
    await wait_for(lambda: client.status.dropped >= 50)
    await asyncio.to_thread(server.restart_grpc)
    await wait_for(lambda: client.status.state == "open", timeout=10)
    got = [await device.recv() for _ in range(100)]
    assert got == [datagram(i) for i in range(50, 150)]
    assert client.status.streams >= 2


async def test_removed_peer_ends_the_stream_then_the_reopen_is_refused(
    server: LoopbackTunnelServer,
) -> None:
    fatal: list[str] = []
    client = client_for(server, on_fatal=fatal.append)
    device = Device(await client.start())
    try:
        device.send(datagram(1))
        assert await device.recv() == datagram(1)
        await asyncio.to_thread(server.revoke, PEER)
        await wait_for(lambda: bool(fatal))
        assert "peer not allowed" in fatal[0] and client.status.streams == 2
    finally:
        device.close()
        await client.close()


async def test_silent_stream_is_reopened(server: LoopbackTunnelServer) -> None:
    client = client_for(server, stale_after=0.3)
    device = Device(await client.start())
    try:
        assert server.hub is not None and server.echo is not None
        device.send(datagram(1))
        assert await device.recv() == datagram(1)
        server.echo.enabled = False  # the far side goes quiet while we keep sending
        device.send(datagram(2))
        await wait_for(lambda: client.status.streams >= 2, timeout=5)
        server.echo.enabled = True
        device.send(datagram(3))
        assert await device.recv() == datagram(3)
    finally:
        device.close()
        await client.close()


async def test_bad_header_is_refused_before_anything_starts() -> None:
    api = ApiEndpoint(host="127.0.0.1", port=1, tls=False)
    with pytest.raises(ValueError, match="x-siderolink-ipv6-addr"):
        TunnelClient(api, "not an address")


async def test_with_a_fixed_device_port_other_local_senders_are_ignored(
    server: LoopbackTunnelServer,
) -> None:
    device_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    device_sock.bind(("127.0.0.1", 0))
    client = client_for(server, device_port=device_sock.getsockname()[1])
    relay = await client.start()
    device_sock.close()
    device = Device(relay)
    intruder = Device(relay)
    try:
        device.sock.close()  # rebind the stand-in device on the fixed port
        device.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        device.sock.bind(("127.0.0.1", client.device_port or 0))
        device.sock.setblocking(False)
        intruder.send(datagram(6))  # never reaches the stream, replies never go to it
        device.send(datagram(7))
        assert await device.recv() == datagram(7)
        with pytest.raises(TimeoutError):
            await intruder.recv(timeout=0.3)
        assert client.status.sent == 1
    finally:
        device.close()
        intruder.close()
        await client.close()
