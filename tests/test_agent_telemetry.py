"""The agent's kernel-log sender on real TCP sockets (loopback): a line queued while a backlog
is still being written goes out, and a connection the sink closed is not written into.

The kernel log itself is not read here (the path given does not exist, so the reader stops at
once): lines are queued the way the reader queues them, so each test knows exactly what was
sent. The kmsg parsing has its own tests (test_fleet_units.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gatekeeper.agent import telemetry as telemetry_module
from gatekeeper.agent.telemetry import Telemetry
from gatekeeper.server.attribution import Attributor
from gatekeeper.server.journal import Journal, read_journal
from gatekeeper.server.logreceiver import LogReceiver
from gatekeeper.server.registry import MachineRecord, machine_key
from gatekeeper.server.sqlite_registry import SqliteRegistry

UUID = "6e0a5c7a-0000-4000-8000-000000000002"


def line(msg: str, pad: int = 0) -> bytes:
    return json.dumps({"msg": msg, "pad": "x" * pad}).encode() + b"\n"


@contextlib.asynccontextmanager
async def sending_to(port: int, tmp_path: Path) -> AsyncIterator[Telemetry]:
    telemetry = Telemetry(kmsg=tmp_path / "no-kmsg")
    telemetry.set_cmdline(f"talos.logging.kernel=tcp://[::1]:{port}")
    task = asyncio.create_task(telemetry.run())
    try:
        yield telemetry
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def read_until(reader: asyncio.StreamReader, marker: bytes, seconds: float) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + seconds
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 16), deadline - time.monotonic())
        except TimeoutError:
            break
        if not chunk:
            break
        start = max(len(got) - len(marker), 0)  # only the new bytes can complete the marker
        got += chunk
        if got.find(marker, start) >= 0:
            break
    return bytes(got)


def slow_listener() -> socket.socket:
    """A loopback listener whose connections have a small receive buffer (inherited), so a
    sender's backlog stays in the sender until the test reads."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("::1", 0))
    listener.listen()
    listener.setblocking(False)
    return listener


def test_a_line_queued_while_the_backlog_is_written_is_sent(tmp_path: Path) -> None:
    # A sink that takes nothing for a while, with a small receive buffer: the sender's drain()
    # waits, and the marker is queued during that wait (as a kernel line written right after
    # the link came up lands while the boot backlog is still going out).
    async def scenario() -> None:
        listener = slow_listener()
        port = listener.getsockname()[1]
        loop = asyncio.get_running_loop()
        async with sending_to(port, tmp_path) as telemetry:
            for n in range(1000):
                telemetry.queue_line(line(f"backlog {n}", pad=8000))
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
            await asyncio.sleep(0.5)  # the sender is now blocked in drain()
            telemetry.queue_line(line("the marker"))
            reader, writer = await asyncio.open_connection(sock=conn)
            got = await read_until(reader, b"the marker", 10)
            writer.close()
        listener.close()
        assert b"backlog 999" in got
        assert b"the marker" in got, "a line queued during drain() was not sent"

    asyncio.run(scenario())


def test_a_connection_the_sink_closed_is_not_written_into(tmp_path: Path) -> None:
    # The real receiver with a short idle timeout: it closes the connection; the next line
    # must go on a new connection (written into the closed one, it would vanish unreported).
    registry = SqliteRegistry(tmp_path / "state")
    registry.claim(MachineRecord(machine_key(UUID, None), UUID, ipaddress.IPv6Address("::1"), "pk"))
    journal = Journal(tmp_path / "logs", max_bytes=1 << 20)
    attributor = Attributor(registry, ipaddress.IPv6Network("::1/128"))
    receiver = LogReceiver(attributor, journal, idle_timeout=0.3)

    def stored() -> list[str]:
        return [e["msg"] for e in read_journal(journal.path(machine_key(UUID, None)))]

    async def eventually_stored(msg: str) -> None:
        deadline = time.monotonic() + 5
        while msg not in stored() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        port = await receiver.start("::1", 0)
        try:
            async with sending_to(port, tmp_path) as telemetry:
                telemetry.queue_line(line("first"))
                await eventually_stored("first")
                await asyncio.sleep(1.0)  # idle: the receiver has closed the connection
                assert receiver.connections == 0
                telemetry.queue_line(line("after the idle close"))
                await eventually_stored("after the idle close")
        finally:
            await receiver.close()

    try:
        asyncio.run(scenario())
        assert stored() == ["first", "after the idle close"]
    finally:
        journal.close()
        registry.close()


def test_a_sink_that_closes_every_connection_is_retried_with_backoff(tmp_path: Path) -> None:
    # Not a log sink (or one refusing us): it accepts and closes at once. Lines keep coming;
    # the agent must not open a connection per line.
    accepted = 0

    async def close_at_once(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(close_at_once, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        async with sending_to(port, tmp_path) as telemetry:
            for n in range(60):  # a line every 50 ms for 3 s
                telemetry.queue_line(line(f"line {n}"))
                await asyncio.sleep(0.05)
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
    # Backoff 0.5 s, x1.5: about 6 attempts in 3 s; one per line would be 60.
    assert 1 <= accepted <= 10, accepted


def test_a_sink_that_floods_the_agent_is_dropped_and_the_agent_goes_on(tmp_path: Path) -> None:
    # A log sink never writes (the stream is one-way). One that floods the agent with data
    # (hostile, or not a log sink) must not be read on, or held: each of its connections ends
    # at the first byte, is retried with backoff, and a proper sink named next gets the lines.
    accepted = 0
    ended = 0

    async def flood(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted, ended
        accepted += 1
        chunk = b"x" * 65536
        try:
            while True:  # until the agent ends the connection
                writer.write(chunk)
                await writer.drain()
        except OSError:  # reset or broken pipe: the agent closed it
            ended += 1
        finally:
            writer.transport.abort()

    async def scenario() -> tuple[bytes, int, int]:
        flooding = await asyncio.start_server(flood, "::1", 0)
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await got.put(await read_until(reader, b"after the flood", 5))
            writer.close()

        proper = await asyncio.start_server(collect, "::1", 0)
        try:
            async with sending_to(flooding.sockets[0].getsockname()[1], tmp_path) as telemetry:
                for n in range(60):  # a line every 50 ms for 3 s
                    telemetry.queue_line(line(f"line {n}"))
                    await asyncio.sleep(0.05)
                flooded = accepted, ended  # before the sink changes (that ends one too)
                telemetry.set_cmdline(
                    f"talos.logging.kernel=tcp://[::1]:{proper.sockets[0].getsockname()[1]}"
                )
                telemetry.queue_line(line("after the flood"))
                return await asyncio.wait_for(got.get(), 10), *flooded
        finally:
            for server in (flooding, proper):
                server.close()
                await server.wait_closed()

    received, accepted, ended = asyncio.run(scenario())
    assert b"after the flood" in received
    # About 5 connections in 3 s with the backoff (one per line would be 60), each ended by
    # the agent; the last may still be in its first moments.
    assert 2 <= accepted <= 10, accepted
    assert accepted - ended <= 1 and ended >= 2, (accepted, ended)


def test_a_sink_that_stops_reading_is_dropped_and_shutdown_does_not_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Accepts, never reads, small buffers: the backlog cannot leave. The sender must give the
    # connection up (and try a new one), and stopping the agent must not wait for the sink.
    monkeypatch.setattr(telemetry_module, "DRAIN_TIMEOUT", 0.5)
    held: list[socket.socket] = []

    async def scenario() -> float:
        listener = slow_listener()
        loop = asyncio.get_running_loop()
        try:
            async with sending_to(listener.getsockname()[1], tmp_path) as telemetry:
                for n in range(1000):
                    telemetry.queue_line(line(f"backlog {n}", pad=8000))
                conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
                held.append(conn)
                await asyncio.sleep(1.5)  # stalled past the (shortened) timeout: dropped
                telemetry.queue_line(line("after the stall"))  # so a new connection
                conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
                held.append(conn)
                stopping = time.monotonic()
            return time.monotonic() - stopping
        finally:
            listener.close()
            for conn in held:
                conn.close()

    stopped_in = asyncio.run(scenario())
    assert len(held) == 2, "the stalled connection was never given up"
    assert stopped_in < 3, f"stopping took {stopped_in:.1f} s"


def test_a_sink_host_the_resolver_refuses_does_not_end_telemetry(tmp_path: Path) -> None:
    # `a..b` passes the command line parser; the resolver refuses it (ValueError, not OSError).
    async def scenario() -> bool:
        telemetry = Telemetry(kmsg=tmp_path / "no-kmsg")
        telemetry.set_cmdline("talos.logging.kernel=tcp://a..b:4000")
        assert telemetry.sinks.kernel_logs == ("a..b", 4000)
        task = asyncio.create_task(telemetry.run())
        telemetry.queue_line(line("to nowhere"))
        await asyncio.sleep(1.5)  # a few attempts, with backoff
        alive = not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return alive

    assert asyncio.run(scenario()), "the telemetry task ended on a bad sink host"
