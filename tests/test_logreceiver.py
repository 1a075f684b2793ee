"""The machine-log receiver on real TCP sockets (loopback): timeouts for idle and slow
senders, connection caps, and bad lines that never take their neighbours with them."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from gatekeeper.server.app import quiet_accept_errors
from gatekeeper.server.attribution import Attributor
from gatekeeper.server.journal import Journal, read_journal
from gatekeeper.server.logreceiver import LogReceiver, nesting_depth
from gatekeeper.server.registry import MachineRecord, machine_key
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.throttle import LogThrottle

LOOPBACK = ipaddress.IPv6Address("::1")
UUID = "6e0a5c7a-0000-4000-8000-000000000001"


def _receiver(tmp_path: Path, **limits: float) -> tuple[LogReceiver, Journal, SqliteRegistry]:
    registry = SqliteRegistry(tmp_path / "state")
    # The machine "is" ::1, so connections from loopback are attributed to it.
    registry.claim(MachineRecord(machine_key(UUID, None), UUID, LOOPBACK, "pk"))
    journal = Journal(tmp_path / "logs", max_bytes=1 << 20)
    attributor = Attributor(registry, ipaddress.IPv6Network("::1/128"))
    return LogReceiver(attributor, journal, **limits), journal, registry  # type: ignore[arg-type]


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(1), seconds) == b""
    return time.monotonic() - started


def test_idle_slow_and_surplus_connections_are_closed(tmp_path: Path) -> None:
    receiver, journal, registry = _receiver(
        tmp_path, per_machine=2, max_connections=3, idle_timeout=0.5, line_timeout=0.6
    )

    async def scenario() -> None:
        port = await receiver.start("::1", 0)
        try:
            idle_r, _idle_w = await asyncio.open_connection("::1", port)
            slow_r, slow_w = await asyncio.open_connection("::1", port)
            # A third from the same machine: over its cap, closed at once.
            third_r, _third_w = await asyncio.open_connection("::1", port)
            assert await _closed_within(third_r, 1.0) < 1.0

            async def trickle() -> None:
                for _ in range(100):  # one byte every 0.1 s for 10 s, never a newline
                    slow_w.write(b"x")
                    await slow_w.drain()
                    await asyncio.sleep(0.1)

            trickler = asyncio.create_task(trickle())
            started = time.monotonic()
            assert 0.4 < await _closed_within(idle_r, 4) < 3.0
            # Never idle, yet closed long before its trickle would end (line_timeout 0.6 s).
            await _closed_within(slow_r, 4)
            assert time.monotonic() - started < 4.0
            trickler.cancel()
            await asyncio.gather(trickler, return_exceptions=True)
            await asyncio.sleep(0.1)
            assert receiver.connections == 0
        finally:
            await receiver.close()

    try:
        asyncio.run(scenario())
    finally:
        journal.close()
        registry.close()


def test_a_total_cap_closes_extra_connections_before_reading(tmp_path: Path) -> None:
    receiver, journal, registry = _receiver(tmp_path, per_machine=10, max_connections=2)

    async def scenario() -> None:
        port = await receiver.start("::1", 0)
        try:
            held = [await asyncio.open_connection("::1", port) for _ in range(2)]
            await asyncio.sleep(0.1)
            extra_r, _ = await asyncio.open_connection("::1", port)
            assert await _closed_within(extra_r, 1.0) < 1.0
            assert receiver.connections == 2
            for _, w in held:
                w.close()
        finally:
            await receiver.close()

    try:
        asyncio.run(scenario())
    finally:
        journal.close()
        registry.close()


def test_a_malformed_or_deep_line_keeps_its_neighbours(tmp_path: Path) -> None:
    receiver, journal, registry = _receiver(tmp_path)

    async def scenario() -> None:
        port = await receiver.start("::1", 0)
        try:
            _, w = await asyncio.open_connection("::1", port)
            # One read: a good line, 5,000 nested [, a deep but parsable object, a good line.
            deep = json.dumps(
                {
                    "msg": "deep",
                    "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                }
            )
            w.write(
                b'{"msg": "before"}\n'
                + b"[" * 5000
                + b"\n"
                + deep.encode()
                + b'\n{"msg": "after"}\n'
            )
            await w.drain()
            w.close()
            await asyncio.sleep(0.3)
        finally:
            await receiver.close()

    try:
        asyncio.run(scenario())
    finally:
        journal.close()
    entries = list(read_journal(journal.path(machine_key(UUID, None))))
    registry.close()
    assert [e.get("malformed", False) for e in entries] == [False, True, True, False]
    assert entries[0]["msg"] == "before" and entries[3]["msg"] == "after"
    assert entries[1]["msg"] == "[" * 5000


def test_nesting_depth_and_log_throttle() -> None:
    assert nesting_depth({"a": [1, {"b": []}]}) == 4 and nesting_depth(5) == 0
    throttle = LogThrottle(2, 10.0)
    assert [throttle.allow("s", t)[0] for t in (0, 1, 2, 3)] == [True, True, False, False]
    assert throttle.allow("other", 3) == (True, 0)
    assert throttle.allow("s", 11) == (True, 2)  # the next logged line counts the suppressed


_CONNECT = """
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()
socks = []
for _ in range(n):
    try:
        socks.append(socket.create_connection(("::1", port), timeout=2))
    except OSError:
        pass
print(len(socks), flush=True)
sys.stdin.readline()
"""


def test_accept_out_of_descriptors_is_one_warning_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real EMFILE in accept(): asyncio's traceback per failure becomes one line."""
    receiver, journal, registry = _receiver(tmp_path, per_machine=1000, max_connections=1000)

    async def scenario() -> None:
        quiet_accept_errors(asyncio.get_running_loop(), every=60.0)
        port = await receiver.start("::1", 0)
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CONNECT, str(port), "60",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert client.stdin is not None and client.stdout is not None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Room for about 20 more descriptors in this process, no more.
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 20, hard))
        try:
            client.stdin.write(b"go\n")
            await client.stdin.drain()
            await asyncio.wait_for(client.stdout.readline(), 30)
            await asyncio.sleep(1.5)  # asyncio retries accept() a second later
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            client.stdin.write(b"done\n")
            await client.stdin.drain()
            await client.wait()
            await receiver.close()

    with caplog.at_level(logging.WARNING):
        try:
            asyncio.run(scenario())
        finally:
            journal.close()
            registry.close()
    failures = [r for r in caplog.records if "accepting a connection failed" in r.getMessage()]
    assert len(failures) == 1 and "EMFILE" in failures[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
