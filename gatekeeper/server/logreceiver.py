"""The machine-log receiver: one JSON object per line over TCP, as Talos sends its logs.

Listens on the server's overlay address only. A connection whose source is not a registered
machine on the overlay is closed at once and nothing is read. Each line goes to the
telemetry store (`telemetry.py`) under that machine, with the time it arrived. Lines longer
than `max_line` are dropped whole (the rest of the line is skipped up to its newline), so one
connection never buffers more than that. A line that is not one JSON object (or nests deeper
than `MAX_DEPTH`) is stored as text, marked malformed; the lines around it are stored as usual.

Connections are bounded, so no machine can take the server's file descriptors: at most
`per_machine` per machine (per source address: on the overlay, one machine's) and
`max_connections` in all (the server sizes it to its open-file limit); one more is closed as
soon as it is accepted. A connection that sends nothing for
`idle_timeout`, or takes longer than `line_timeout` to finish a line it started (a slow
sender), is closed; the machine reconnects when it next has something to say.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import time
from typing import Any

from gatekeeper.server.attribution import Attributor
from gatekeeper.server.audit import rfc3339
from gatekeeper.server.escape import shown
from gatekeeper.server.metrics import ServerMetrics
from gatekeeper.server.registry import MachineRecord, RegistryError
from gatekeeper.server.telemetry import TelemetrySink
from gatekeeper.throttle import LogThrottle

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10
MAX_CONNECTIONS = 4096
PER_MACHINE = 8
IDLE_TIMEOUT = 600.0
LINE_TIMEOUT = 30.0
READ_CHUNK = 64 << 10
# Talos's log lines are flat objects; anything nested deeper is not a log line.
MAX_DEPTH = 32
# Refusal log lines per source and minute (a flood is summarised, not written line by line).
REFUSAL_LOGS_PER_MINUTE = 5


def nesting_depth(doc: object, limit: int = MAX_DEPTH) -> int:
    """How deep lists and objects nest in a parsed JSON value (stops counting past `limit`)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return deepest


def log_entry(raw: bytes, machine: MachineRecord, now: float) -> dict[str, Any]:
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        # RecursionError: thousands of `[` make the parser give up; the line is still kept.
        doc = None
    if doc is not None and nesting_depth(doc) > MAX_DEPTH:
        doc = None
    entry: dict[str, Any] = {"received": rfc3339(now), "machine": machine.node_uuid}
    if isinstance(doc, dict):
        entry.update({k: v for k, v in doc.items() if k not in entry})
    else:
        # Not one JSON object: keep the text, marked, rather than lose the line.
        entry["msg"] = text
        entry["malformed"] = True
    return entry


class LogReceiver:
    def __init__(
        self,
        attributor: Attributor,
        sink: TelemetrySink,
        metrics: ServerMetrics | None = None,
        *,
        max_line: int = MAX_LINE,
        max_connections: int = MAX_CONNECTIONS,
        per_machine: int = PER_MACHINE,
        idle_timeout: float = IDLE_TIMEOUT,
        line_timeout: float = LINE_TIMEOUT,
    ) -> None:
        self.attributor = attributor
        self.sink = sink
        self.metrics = metrics
        self.max_line = max_line
        self.max_connections = max_connections
        self.per_machine = per_machine
        self.idle_timeout = idle_timeout
        self.line_timeout = line_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._per_address: collections.Counter[str] = collections.Counter()
        self._refusals = LogThrottle(REFUSAL_LOGS_PER_MINUTE, 60.0)

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            # Before anything else: this descriptor goes back at once.
            self._refuse(writer.get_extra_info("peername"), "too many log connections")
            writer.transport.abort()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _refuse(self, peer: object, why: str) -> None:
        if self.metrics:
            self.metrics.telemetry_refused.labels("logs").inc()
        source = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        allowed, suppressed = self._refusals.allow(source, time.monotonic())
        if allowed:
            more = f" ({suppressed} more refusals from there not logged)" if suppressed else ""
            log.info("log connection from %s refused: %s%s", shown(source), why, more)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            address = ipaddress.IPv6Address(str(peer[0]).split("%")[0])
        except (ValueError, TypeError, IndexError):
            address = None
        # Counted by source address (on the overlay, one machine's) before the registry is
        # asked: the lookup waits, and the connections must count in the order they came.
        source = str(address)
        if self._per_address[source] >= self.per_machine:
            self._refuse(peer, f"that address already has {self.per_machine} log connections")
            return
        self._per_address[source] += 1
        try:
            try:
                machine = await self.attributor.machine(address)
            except RegistryError:
                self._refuse(peer, "the registry is unreachable, the machine unknown")
                return
            if machine is None:
                self._refuse(peer, "not a registered machine")
                return
            await self._lines(reader, machine)
        finally:
            self._per_address[source] -= 1
            if self._per_address[source] <= 0:
                del self._per_address[source]

    async def _lines(self, reader: asyncio.StreamReader, machine: MachineRecord) -> None:
        pending = b""
        skipping = False
        loop = asyncio.get_running_loop()
        line_started: float | None = None
        while True:
            # Idle: nothing at all for idle_timeout. Slow: a started line not finished in
            # line_timeout, however it trickles in.
            timeout = self.idle_timeout
            if line_started is not None:
                timeout = min(timeout, line_started + self.line_timeout - loop.time())
            if timeout <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if skipping and lines:
                lines, skipping = lines[1:], False
            if len(pending) > self.max_line:
                pending, skipping = b"", True
            if lines:
                line_started = None
            if (pending or skipping) and line_started is None:
                line_started = loop.time()
            self._store(machine, [line for line in lines if len(line) <= self.max_line])
        if pending and not skipping:
            self._store(machine, [pending])

    def _store(self, machine: MachineRecord, lines: list[bytes]) -> None:
        lines = [line for line in lines if line.strip()]
        if not lines:
            return
        now = time.time()
        entries = []
        for line in lines:
            try:
                entries.append(log_entry(line, machine, now))
            except Exception:  # one bad line must not take its neighbours with it
                entries.append(
                    {"received": rfc3339(now), "machine": machine.node_uuid, "malformed": True}
                )
        try:
            self.sink.append(machine.machine_key, entries)
        except (OSError, ValueError, RecursionError) as exc:
            log.warning(
                "cannot store %d log lines of %s: %s",
                len(entries),
                shown(machine.node_uuid, 64),
                exc,
            )
            return
        if self.metrics:
            self.metrics.log_lines.inc(len(lines))
