"""CreateStream's header rules on the wire, checked with a client built from field numbers
(tests/wirecompat.py) against the real TunnelHub on a loopback gRPC server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import wirecompat

from gatekeeper.tunnel.loopback import LoopbackTunnelServer

PEER_A = "[fdae:41e4:649b:9304:1a2b:3c4d:5e6f:7081]:50889"
PEER_B = "[fdae:41e4:649b:9304::b]:50889"
TRANSPORT = b"\x04\0\0\0" + bytes(28)
OFFER = [("x-gatekeeper-batch", "1")]


def data(n: int, size: int = 1312) -> bytes:
    """A transport-shaped datagram whose bytes say which one it is."""
    body = bytes([n % 256]) * (size - 4)
    return b"\x04\0\0\0" + body


@pytest.fixture
def server() -> Iterator[LoopbackTunnelServer]:
    with LoopbackTunnelServer() as srv:
        srv.allow(PEER_A)
        srv.allow(PEER_B)
        yield srv


def received(stream: wirecompat.RawStream, count: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        packet: dict[str, Any] = stream.recv_packet()
        got += ([packet["Data"]] if packet["Data"] else []) + packet["batch"]
    return got


@pytest.mark.parametrize(
    ("header", "code", "details"),
    [
        (None, grpc.StatusCode.INVALID_ARGUMENT, "x-siderolink-ipv6-addr header is required"),
        ("fdae::1", grpc.StatusCode.INVALID_ARGUMENT, "not [IPv6]:port"),
        ("[fdae::zz]:50889", grpc.StatusCode.INVALID_ARGUMENT, "no IPv6 address"),
        ("[fdae:41e4:649b:9304::dead]:50889", grpc.StatusCode.PERMISSION_DENIED, None),
        # The right address on another port is another peer.
        ("[fdae:41e4:649b:9304::b]:50888", grpc.StatusCode.PERMISSION_DENIED, None),
    ],
)
def test_a_stream_without_a_known_header_is_refused(
    server: LoopbackTunnelServer, header: str | None, code: grpc.StatusCode, details: str | None
) -> None:
    with wirecompat.open_raw_stream(server.target, header) as stream:
        got_code, got_details = stream.wait_end()
    assert got_code == code
    if details is None:
        assert got_details == "peer not allowed"
    else:
        assert details in got_details


def test_a_known_peer_gets_its_datagrams_through_one_per_message(
    server: LoopbackTunnelServer,
) -> None:
    # Any spelling of the address names the same peer (canonicalised before the lookup).
    header = "[FDAE:41E4:649B:9304:1A2B:3C4D:5E6F:7081]:50889"
    with wirecompat.open_raw_stream(server.target, header) as stream:
        for i in range(5):
            stream.send(data(i))
        for i in range(5):
            packet = stream.recv_packet()
            # No batching was offered: exactly one datagram in Data, field 3 never used.
            assert packet == {"Data": data(i), "batch": []}
        assert dict(stream.call.initial_metadata()).get("x-gatekeeper-batch") is None


def test_a_second_stream_replaces_the_first(server: LoopbackTunnelServer) -> None:
    with wirecompat.open_raw_stream(server.target, PEER_A) as first:
        first.send(TRANSPORT)
        assert first.recv() == TRANSPORT
        with wirecompat.open_raw_stream(server.target, PEER_A) as second:
            second.send(data(7))
            assert second.recv() == data(7)
            assert first.wait_end() == (grpc.StatusCode.ABORTED, "peer replaced")
            second.send(data(8))
            assert second.recv() == data(8)


def test_batches_flow_only_after_both_sides_announced(server: LoopbackTunnelServer) -> None:
    with wirecompat.open_raw_stream(server.target, PEER_A, extra_metadata=OFFER) as stream:
        answer = dict(stream.call.initial_metadata())
        assert answer["x-gatekeeper-batch"] == "1"
        assert answer["x-gatekeeper-batch-bytes"] == str(15 * 1024)  # the hub's budget
        stream.send(data(1), batch=[data(2), data(3)])
        stream.send(batch=[data(4)])
        assert received(stream, 4) == [data(1), data(2), data(3), data(4)]
    # Without the offer, field 3 is refused: only Data reaches the device and comes back.
    with wirecompat.open_raw_stream(server.target, PEER_B) as stream:
        stream.send(data(1), batch=[data(2)])
        stream.send(data(3))
        assert stream.recv() == data(1) and stream.recv() == data(3)


def test_oversized_datagram_cuts_only_that_stream(server: LoopbackTunnelServer) -> None:
    with (
        wirecompat.open_raw_stream(server.target, PEER_A) as bad,
        wirecompat.open_raw_stream(server.target, PEER_B) as good,
    ):
        good.send(data(1))
        assert good.recv() == data(1)
        bad.send(b"\x04\0\0\0" + bytes(70_000 - 4))
        code, details = bad.wait_end()
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "larger than" in details
        good.send(data(2))
        assert good.recv() == data(2)


def test_garbage_is_dropped_then_cut_without_harming_others(server: LoopbackTunnelServer) -> None:
    seen_before = server.echo.seen
    with (
        wirecompat.open_raw_stream(server.target, PEER_A) as bad,
        wirecompat.open_raw_stream(server.target, PEER_B) as good,
    ):
        for _ in range(20):
            bad.send(b"GET / HTTP/1.1\r\n\r\n")
        code, details = bad.wait_end()
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not WireGuard" in details
        good.send(data(5))
        assert good.recv() == data(5)
    assert server.echo.seen == seen_before + 1  # no garbage reached the device


def test_flooding_stream_is_paced_and_others_still_pass() -> None:
    with LoopbackTunnelServer(rate=2000, burst=100) as srv:
        srv.allow(PEER_A)
        srv.allow(PEER_B)
        with (
            wirecompat.open_raw_stream(srv.target, PEER_A, extra_metadata=OFFER) as flood,
            wirecompat.open_raw_stream(srv.target, PEER_B) as good,
        ):
            start = time.monotonic()
            for _ in range(100):
                flood.send(batch=[TRANSPORT] * 20)  # 2,000 datagrams: 1 s at 2,000/s
            good.send(data(9))
            assert good.recv() == data(9)
            assert time.monotonic() - start < 0.5  # not queued behind the flood
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                time.sleep(0.05)
            info = srv.call(srv.hub.info, PEER_A) if srv.hub else None
            assert info is not None and info.to_device < 2000  # still held back


def test_stream_of_a_removed_peer_ends_cleanly(server: LoopbackTunnelServer) -> None:
    with wirecompat.open_raw_stream(server.target, PEER_A) as stream:
        stream.send(TRANSPORT)
        assert stream.recv() == TRANSPORT
        server.revoke(PEER_A)
        assert stream.wait_end() == (grpc.StatusCode.OK, "")
    with wirecompat.open_raw_stream(server.target, PEER_A) as again:
        assert again.wait_end() == (grpc.StatusCode.PERMISSION_DENIED, "peer not allowed")
    assert server.hub is not None and server.call(server.hub.allowed) == [PEER_B]


def test_device_datagrams_for_a_peer_without_a_stream_are_dropped(
    server: LoopbackTunnelServer,
) -> None:
    hub = server.hub
    assert hub is not None and server.echo.transport is not None
    relay = server.allow(PEER_A)  # already admitted: the same relay endpoint comes back
    host, port = relay.rsplit(":", 1)
    server.call(server.echo.transport.sendto, TRANSPORT, (host, int(port)))
    deadline = time.monotonic() + 2
    while (info := server.call(hub.info, PEER_A)) and info.dropped < 1:
        assert time.monotonic() < deadline, info
        time.sleep(0.01)
    # A stream opened later does not get stale datagrams replayed.
    with wirecompat.open_raw_stream(server.target, PEER_A) as stream:
        stream.send(data(3))
        assert stream.recv() == data(3)
