"""The machine-log receiver: one JSON object per line over TCP, as Talos sends its logs.

Listens on the server's overlay address only. A connection whose source is not a registered
machine on the overlay is closed at once and nothing is read. Each line is stored in that
machine's journal with the time it arrived. Lines longer than `max_line` are dropped whole
(the rest of the line is skipped up to its newline), so one connection never buffers more
than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from typing import Any

from gatekeeper.server.attribution import Attributor
from gatekeeper.server.audit import rfc3339
from gatekeeper.server.journal import Journal
from gatekeeper.server.metrics import ServerMetrics
from gatekeeper.server.registry import MachineRecord

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10
MAX_CONNECTIONS = 4096
READ_CHUNK = 64 << 10


def log_entry(raw: bytes, machine: MachineRecord, now: float) -> dict[str, Any]:
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
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
        journal: Journal,
        metrics: ServerMetrics | None = None,
        *,
        max_line: int = MAX_LINE,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.attributor = attributor
        self.journal = journal
        self.metrics = metrics
        self.max_line = max_line
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            address = ipaddress.IPv6Address(str(peer[0]).split("%")[0])
        except (ValueError, TypeError, IndexError):
            address = None
        machine = self.attributor.machine(address)
        if machine is None or len(self._connections) > self.max_connections:
            if self.metrics:
                self.metrics.telemetry_refused.labels("logs").inc()
            log.info("log connection from %s refused: not a registered machine", peer)
            return
        pending = b""
        skipping = False
        while True:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if skipping and lines:
                lines, skipping = lines[1:], False
            if len(pending) > self.max_line:
                pending, skipping = b"", True
            self._store(machine, [line for line in lines if len(line) <= self.max_line])
        if pending and not skipping:
            self._store(machine, [pending])

    def _store(self, machine: MachineRecord, lines: list[bytes]) -> None:
        lines = [line for line in lines if line.strip()]
        if not lines:
            return
        now = time.time()
        self.journal.append(machine.machine_key, [log_entry(line, machine, now) for line in lines])
        if self.metrics:
            self.metrics.log_lines.inc(len(lines))
