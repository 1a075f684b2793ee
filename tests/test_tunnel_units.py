"""Sans-I/O parts of the tunnel: queue, header, batching, datagram checks, throttle."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.overlay import TUNNEL_SUFFIX, overlay_prefix
from gatekeeper.tunnel import batching
from gatekeeper.tunnel.errors import is_fatal
from gatekeeper.tunnel.guard import StreamGuard, TokenBucket, Verdict, check_datagram
from gatekeeper.tunnel.header import (
    PEER_HEADER,
    HeaderError,
    canonical_peer,
    header_from_metadata,
    parse_addr_port,
    tunnel_addr_port,
    tunnel_secret,
)
from gatekeeper.tunnel.pump import start_now
from gatekeeper.tunnel.queue import DropOldestQueue
from gatekeeper.wireguard.keys import PrivateKey

TRANSPORT = b"\x04\0\0\0" + bytes(28)  # the smallest transport message (a keepalive)


# -- queue ----------------------------------------------------------------------------------


def test_full_queue_drops_the_oldest_and_counts_it() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(3)
    assert [q.push(i) for i in range(5)] == [False, False, False, True, True]
    assert list(q) == [2, 3, 4] and q.dropped == 2 and len(q) == 3
    assert q.pop() == 2 and q.peek() == 3
    assert q.clear() == 2 and not q


def test_default_queue_holds_the_spec_s_hundred() -> None:
    q: DropOldestQueue[int] = DropOldestQueue()
    for i in range(250):
        q.push(i)
    assert len(q) == 100 and q.peek() == 150 and q.dropped == 150


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DropOldestQueue(0)


@given(st.lists(st.integers()), st.integers(1, 20))
def test_queue_keeps_exactly_the_newest(items: list[int], size: int) -> None:
    q: DropOldestQueue[int] = DropOldestQueue(size)
    for i in items:
        q.push(i)
    assert list(q) == items[-size:] if items else list(q) == []
    assert q.dropped == max(0, len(items) - size)


# -- header ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("[fdae:41e4:649b:9304::1]:50889", "[fdae:41e4:649b:9304::1]:50889"),
        ("[FDAE:41E4:649B:9304:0:0:0:1]:50889", "[fdae:41e4:649b:9304::1]:50889"),
        ("[fdae:41e4:649b:9304:0000:0000:0000:0001]:50888", "[fdae:41e4:649b:9304::1]:50888"),
        # RFC 5952: the longest run of zeros is compressed, a single zero group is not.
        ("[2001:db8:0:0:1:0:0:1]:1", "[2001:db8::1:0:0:1]:1"),
        ("[1:0:1:1:1:1:1:1]:65535", "[1:0:1:1:1:1:1:1]:65535"),
    ],
)
def test_header_is_canonicalised(value: str, canonical: str) -> None:
    assert canonical_peer(value) == canonical


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "required"),
        ("", "required"),
        ("fdae::1:50889", r"not \[IPv6\]:port"),
        ("[fdae::1]", r"not \[IPv6\]:port"),
        ("[fdae::1]:0", "no valid port"),
        ("[fdae::1]:65536", "no valid port"),
        ("[fdae::1]:+1", "no valid port"),
        ("[fdae::1]:٣", "no valid port"),
        ("[10.0.0.1]:50889", "no IPv6 address"),
        ("[fe80::1%eth0]:50889", "zone"),
        ("[" + "f" * 100 + "]:1", "too long"),
    ],
)
def test_bad_headers_name_the_problem(value: str | None, why: str) -> None:
    with pytest.raises(HeaderError, match=why) as err:
        canonical_peer(value)
    assert PEER_HEADER in str(err.value) and "\n" not in str(err.value)


@given(st.text(max_size=80))
def test_header_parser_never_crashes(value: str) -> None:
    try:
        out = canonical_peer(value)
    except HeaderError:
        return
    assert canonical_peer(out) == out


def test_header_is_read_from_metadata_pairs() -> None:
    assert header_from_metadata([("a", "b"), (PEER_HEADER, "[::1]:1")]) == "[::1]:1"
    assert header_from_metadata([(PEER_HEADER, b"[::1]:2")]) == "[::1]:2"
    assert header_from_metadata(None) is None and header_from_metadata([]) is None


def test_virtual_address_is_unguessable_and_stable_per_key() -> None:
    prefix = overlay_prefix("", TUNNEL_SUFFIX)
    secret, other_secret = tunnel_secret("server-a"), tunnel_secret("server-b")
    key_a, key_b = (PrivateKey.generate().public_key().base64() for _ in range(2))
    virtual = tunnel_addr_port(prefix, secret, key_a)
    address, port = parse_addr_port(virtual)
    assert address in prefix and port == 50889
    assert tunnel_addr_port(prefix, secret, key_a) == virtual  # the same key: the same name
    assert tunnel_addr_port(prefix, secret, key_b) != virtual  # a new key: a new name
    assert tunnel_addr_port(prefix, other_secret, key_a) != virtual  # needs the server's secret
    assert tunnel_addr_port(prefix, secret, key_a, 50888).endswith("]:50888")


# -- batching -------------------------------------------------------------------------------


def test_batching_needs_the_offer_and_the_echo() -> None:
    assert batching.announced(batching.offer())
    assert batching.announced([("x-gatekeeper-batch", b"1")])
    assert not batching.announced([("x-gatekeeper-batch", "2")])
    assert not batching.announced([("other", "1")]) and not batching.announced(None)
    # The server echoes only to a client that offered.
    assert batching.answer(batching.offer(), 61440) == (
        ("x-gatekeeper-batch", "1"),
        ("x-gatekeeper-batch-bytes", "61440"),
    )
    assert batching.answer([(PEER_HEADER, "[::1]:1")]) == ()


def test_announced_batch_budget_is_clamped_and_defaults_small() -> None:
    assert batching.batch_bytes(batching.answer(batching.offer(), 61440)) == 61440
    assert batching.batch_bytes([("x-gatekeeper-batch-bytes", b"100")]) == 1500
    assert batching.batch_bytes([("x-gatekeeper-batch-bytes", str(1 << 30))]) == 1 << 20
    assert batching.batch_bytes([("x-gatekeeper-batch-bytes", "lots")]) == 15 * 1024
    assert batching.batch_bytes(batching.offer()) == 15 * 1024  # an older Gatekeeper server


def test_without_batching_one_datagram_per_message() -> None:
    q: DropOldestQueue[bytes] = DropOldestQueue()
    for i in range(3):
        q.push(bytes([i]) * 40)
    assert batching.take(q, batching=False) == [bytes(40)]
    assert len(q) == 2


def test_with_batching_take_what_is_queued_now_and_never_wait() -> None:
    q: DropOldestQueue[bytes] = DropOldestQueue()
    assert batching.take(q, batching=True) == []
    q.push(b"a" * 10)
    assert batching.take(q, batching=True) == [b"a" * 10]  # alone: no waiting for company
    for i in range(100):
        q.push(bytes([i]) * 1000)
    first = batching.take(q, batching=True, max_count=64, max_bytes=1 << 20)
    assert len(first) == 64 and first[0][0] == 0 and first[-1][0] == 63
    rest = batching.take(q, batching=True, max_count=64, max_bytes=5000)
    assert [d[0] for d in rest] == [64, 65, 66, 67, 68]


def test_default_batch_fits_the_server_s_16_kib_messages() -> None:
    q: DropOldestQueue[bytes] = DropOldestQueue()
    for _ in range(100):
        q.push(bytes(1312))
    taken = batching.take(q, batching=True)
    framing = 3 * len(taken)  # tag and length of each repeated bytes entry
    assert len(taken) == 11 and sum(map(len, taken)) + framing < 16 * 1024


def test_an_oversized_datagram_still_travels_alone() -> None:
    q: DropOldestQueue[bytes] = DropOldestQueue()
    q.push(b"x" * 10_000)
    q.push(b"y")
    assert batching.take(q, batching=True, max_bytes=100) == [b"x" * 10_000]


def test_message_fields_single_goes_in_data() -> None:
    assert batching.fields([b"a"], batching=True) == (b"a", [])
    assert batching.fields([b"a", b"b"], batching=True) == (b"", [b"a", b"b"])
    with pytest.raises(ValueError, match="negotiated"):
        batching.fields([b"a", b"b"], batching=False)


def test_received_message_datagrams() -> None:
    assert batching.datagrams(b"a", [], batching=False) == ([b"a"], 0)
    assert batching.datagrams(b"a", [b"b", b"c"], batching=True) == ([b"a", b"b", b"c"], 0)
    assert batching.datagrams(b"", [b"b"], batching=True) == ([b"b"], 0)
    # A peer that never negotiated has no business filling field 3.
    assert batching.datagrams(b"a", [b"b", b"c"], batching=False) == ([b"a"], 2)
    assert batching.datagrams(b"", [], batching=True) == ([], 0)


# -- datagram checks and throttle -----------------------------------------------------------


@pytest.mark.parametrize(
    ("datagram", "verdict"),
    [
        (b"\x01\0\0\0" + bytes(144), Verdict.OK),
        (b"\x02\0\0\0" + bytes(88), Verdict.OK),
        (b"\x03\0\0\0" + bytes(60), Verdict.OK),
        (TRANSPORT, Verdict.OK),
        (TRANSPORT + bytes(16 * 82), Verdict.OK),
        (b"\x01\0\0\0" + bytes(100), Verdict.MALFORMED),
        (TRANSPORT + bytes(5), Verdict.MALFORMED),
        (b"\x05\0\0\0" + bytes(28), Verdict.MALFORMED),
        (b"\x04\0\x01\0" + bytes(28), Verdict.MALFORMED),
        (b"", Verdict.MALFORMED),
        (b"GET / HTTP/1.1\r\n", Verdict.MALFORMED),
        (TRANSPORT + bytes(16 * 600), Verdict.OVERSIZED),
    ],
)
def test_datagram_shapes(datagram: bytes, verdict: Verdict) -> None:
    assert check_datagram(datagram) is verdict


def test_guard_cuts_oversized_at_once_and_garbage_after_a_few() -> None:
    guard = StreamGuard(max_datagram=2000, malformed_limit=3)
    good, cut = guard.admit([TRANSPORT, b"junk", TRANSPORT])
    assert good == [TRANSPORT, TRANSPORT] and cut is None
    good, cut = guard.admit([b"junk", TRANSPORT, b"junk"])
    assert good == [TRANSPORT] and cut is not None and cut.code == "INVALID_ARGUMENT"
    assert "not WireGuard" in cut.message
    big = StreamGuard(max_datagram=2000)
    good, cut = big.admit([TRANSPORT, TRANSPORT + bytes(16 * 200)])
    assert good == [TRANSPORT] and cut is not None and "2000" in cut.message
    assert StreamGuard(malformed_limit=2).refuse(2) is not None


def test_token_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(rate=100, burst=10)
    assert bucket.delay(10, now=0.0) == 0.0
    assert bucket.delay(5, now=0.0) == pytest.approx(0.05)
    assert bucket.delay(0, now=1.0) == 0.0  # refilled (capped at the burst)
    assert bucket.delay(10, now=1.0) == 0.0
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_fatal_endings_are_exactly_the_spec_s_two() -> None:
    assert is_fatal("PERMISSION_DENIED", "peer not allowed")
    assert is_fatal("ABORTED", "peer replaced\n")
    assert not is_fatal("PERMISSION_DENIED", "invalid join token")
    assert not is_fatal("UNAVAILABLE", "peer replaced")
    assert not is_fatal("ABORTED", None)


def test_tunnel_raises_only_the_message_limits_that_are_set() -> None:
    from gatekeeper.tunnel.server import TUNNEL_MESSAGE_LIMIT, server_options

    options = [("grpc.max_receive_message_length", 16384), ("grpc.so_reuseport", 0)]
    assert server_options(options) == [
        ("grpc.max_receive_message_length", TUNNEL_MESSAGE_LIMIT),
        ("grpc.so_reuseport", 0),
    ]
    assert server_options([("grpc.max_send_message_length", 1 << 22)]) == [
        ("grpc.max_send_message_length", 1 << 22)
    ]


# -- starting a write at once ----------------------------------------------------------------


async def test_start_now_runs_up_to_the_first_wait_before_returning() -> None:
    steps: list[str] = []
    release = asyncio.Event()

    async def write() -> int:
        steps.append("sent")
        await release.wait()
        steps.append("done")
        return 7

    fut = start_now(write())
    assert steps == ["sent"]  # no loop iteration passed, yet the first part ran
    release.set()
    assert await fut == 7
    assert steps == ["sent", "done"]


async def test_start_now_reports_failures_and_passes_cancellation_in() -> None:
    async def broken() -> None:
        raise OSError("no route")

    with pytest.raises(OSError, match="no route"):
        await start_now(broken())

    cleaned: list[bool] = []

    async def waiting() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    fut = start_now(waiting())
    await asyncio.sleep(0)
    fut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fut
    assert cleaned == [True]
