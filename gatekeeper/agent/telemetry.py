"""The machine's telemetry: its own status events and its kernel log, sent over the overlay.

Honours two kernel command line parameters, as Talos does:
- `talos.events.sink=[fdae:…::1]:8090`: `events.EventSinkService/Publish` (plaintext gRPC);
- `talos.logging.kernel=tcp://[fdae:…::1]:8092`: kernel log lines from /dev/kmsg, one JSON
  object per line (`msg`, `talos-time`, `talos-level`, `facility`, `seq`, `clock`,
  `priority`).

Both usually point at the server's overlay address, reachable only once the link is up, so
senders retry (the agent's one backoff, cut short when the link comes up) and queues are
bounded (the oldest entries go first). The log connection stays open while idle; when the sink
closes it (its idle timeout), the next line opens a new one; a sink that takes nothing for
30 s loses the connection (and what was buffered for it) and is tried again.
Status events are `google.protobuf.Struct` payloads built from the status document, sent when
the state, the connection or the address changes. Secrets never reach the status document.

Parsing (command line, kmsg records) is pure; the I/O is in `Telemetry`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import errno
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf import any_pb2, struct_pb2

from gatekeeper.agent.runner import Backoff
from gatekeeper.config.cmdline import cmdline_values
from gatekeeper.netaddr import join_host_port, split_host_port
from gatekeeper.pb.events import events_pb2, events_pb2_grpc

log = logging.getLogger(__name__)

EVENTS_SINK = "talos.events.sink"
KERNEL_LOGS = "talos.logging.kernel"
KMSG = Path("/dev/kmsg")
EVENT_QUEUE = 100
LOG_QUEUE = 1000
# A log connection that ends sooner than this after it opened counts as a failed attempt.
SHORT_CONNECTION = 1.0
# A log sink that takes none of what is sent for this long has its connection dropped (then
# retried): a stalled or hostile sink must not hold the sender, or the agent's shutdown.
DRAIN_TIMEOUT = 30.0
PUBLISH_DEADLINE = 5.0
# The status fields that make an event when they change, and the ones an event carries.
_TRIGGERS = ("state", "connected", "node_address", "link_name")
_CARRIED = (*_TRIGGERS, "endpoint", "tunnel", "server_address", "last_error", "provisions")

LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
    "uucp", "cron", "authpriv", "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip


@dataclass(frozen=True)
class Sinks:
    events: str | None = None  # host:port for a gRPC target
    kernel_logs: tuple[str, int] | None = None


def _host_port(text: str) -> tuple[str, int]:
    # The one host:port rule (gatekeeper.netaddr): an IPv6 literal needs brackets.
    return split_host_port(text, "value")


def sinks_from_cmdline(text: str) -> tuple[Sinks, list[str]]:
    """The sinks named on the command line (first occurrence wins), and why any was ignored."""
    problems: list[str] = []
    events = None
    values = cmdline_values(text, EVENTS_SINK)
    if values:
        try:
            host, port = _host_port(values[0])
            events = join_host_port(host, port)
        except ValueError as exc:
            problems.append(f"{EVENTS_SINK}: {exc}")
    logs = None
    values = cmdline_values(text, KERNEL_LOGS)
    if values:
        url = urlsplit(values[0])
        try:
            if url.scheme != "tcp":
                raise ValueError(f"scheme {url.scheme or '(none)'!r} is not supported, use tcp://")
            logs = _host_port(url.netloc)
        except ValueError as exc:
            problems.append(f"{KERNEL_LOGS}: {exc}")
    return Sinks(events, logs), problems


def rfc3339_nano(ts: float) -> str:
    whole = int(ts)
    stamp = datetime.datetime.fromtimestamp(whole, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{round((ts - whole) * 1e9):09d}Z"


def parse_kmsg(record: bytes, boot_time: float) -> dict[str, Any] | None:
    """One /dev/kmsg record (`prio,seq,usec,flags;text` + continuation lines) -> a log line."""
    header, sep, body = record.partition(b";")
    if not sep:
        return None
    fields = header.split(b",")
    try:
        prio, seq, usec = int(fields[0]), int(fields[1]), int(fields[2])
    except (ValueError, IndexError):
        return None
    # Continuation lines (" KEY=value") are metadata, not message text.
    text = body.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    level = LEVELS[prio & 7]
    facility = prio >> 3
    return {
        "msg": text,
        "talos-time": rfc3339_nano(boot_time + usec / 1e6),
        "talos-level": level,
        "facility": FACILITIES[facility] if facility < len(FACILITIES) else str(facility),
        "seq": seq,
        "clock": usec,
        "priority": level,
    }


def status_event(doc: dict[str, Any]) -> events_pb2.EventRequest:
    payload = struct_pb2.Struct()
    payload.update({k: doc.get(k) for k in _CARRIED})
    data = any_pb2.Any()
    data.Pack(payload)
    return events_pb2.EventRequest(data=data, id=str(uuid.uuid4()))


class Telemetry:
    def __init__(self, *, kmsg: Path = KMSG, backoff: Backoff | None = None) -> None:
        self.kmsg = kmsg
        self.backoff = backoff or Backoff()
        self.sinks = Sinks()
        self._events: collections.deque[events_pb2.EventRequest] = collections.deque(
            maxlen=EVENT_QUEUE
        )
        self._lines: collections.deque[bytes] = collections.deque(maxlen=LOG_QUEUE)
        self._wake_events = asyncio.Event()
        self._wake_lines = asyncio.Event()
        self._last_trigger: tuple[Any, ...] | None = None
        # Set when the link comes up: senders waiting out a backoff try again at once.
        self._nudge = asyncio.Event()
        self._problems: list[str] = []

    def status(self, doc: dict[str, Any]) -> None:
        """Called with every published status document; queues an event when it matters."""
        trigger = tuple(doc.get(k) for k in _TRIGGERS)
        if trigger == self._last_trigger:
            return
        self._last_trigger = trigger
        if doc.get("connected"):
            self._nudge.set()
        if self.sinks.events:
            self._events.append(status_event(doc))
            self._wake_events.set()

    def set_cmdline(self, text: str) -> None:
        """The kernel command line as the agent's config source last read it."""
        sinks, problems = sinks_from_cmdline(text)
        if problems != self._problems:
            for problem in problems:
                log.warning("telemetry: ignoring %s", problem)
            self._problems = problems
        if sinks != self.sinks:
            log.info(
                "telemetry: events to %s, kernel logs to %s",
                sinks.events or "nowhere",
                f"tcp://[{sinks.kernel_logs[0]}]:{sinks.kernel_logs[1]}"
                if sinks.kernel_logs
                else "nowhere",
            )
            self.sinks = sinks
            self._wake_events.set()
            self._wake_lines.set()
            self._nudge.set()  # a sender backing off from the old sink tries the new one now

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._send_events()),
            asyncio.create_task(self._read_kmsg()),
            asyncio.create_task(self._send_lines()),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _backoff(self, failures: int) -> None:
        """The agent's one retry policy; the link coming up ends the wait early."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._nudge.wait(), self.backoff.delay(failures))
        self._nudge.clear()

    async def _send_events(self) -> None:
        failures = 0
        channel: grpc.aio.Channel | None = None
        target = None
        try:
            while True:
                if not self._events or not self.sinks.events:
                    self._wake_events.clear()
                    await self._wake_events.wait()
                    continue
                if channel is None or target != self.sinks.events:
                    if channel is not None:
                        await channel.close(None)
                    target = self.sinks.events
                    # The sink is on the overlay, reached over WireGuard only: never through
                    # an https_proxy from the environment (that is for the API, see
                    # provision_client.py), which could not reach it anyway.
                    channel = grpc.aio.insecure_channel(
                        target, options=[("grpc.enable_http_proxy", 0)]
                    )
                stub = events_pb2_grpc.EventSinkServiceStub(channel)  # type: ignore[no-untyped-call]
                try:
                    await stub.Publish(self._events[0], timeout=PUBLISH_DEADLINE)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                        # Not (yet) a registered machine on the overlay: the next status
                        # change will bring a fresh event; this one is dropped.
                        self._events.popleft()
                    log.debug("telemetry: event not sent: %s", exc.code().name)
                    failures += 1
                    await self._backoff(failures)
                    continue
                self._events.popleft()
                failures = 0
        finally:
            if channel is not None:
                await channel.close(None)

    def queue_line(self, line: bytes) -> None:
        """One newline-terminated log line for the kernel log sink (the oldest go first)."""
        self._lines.append(line)
        self._wake_lines.set()

    async def _read_kmsg(self) -> None:
        try:
            fd = os.open(self.kmsg, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            log.info("telemetry: kernel log not readable (%s): not sending it", exc.strerror)
            return
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        boot_time = time.time() - time.monotonic()
        try:
            while True:
                for line in self._drain(fd, boot_time):
                    self.queue_line(line)
                readable.clear()
                await readable.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    @staticmethod
    def _drain(fd: int, boot_time: float) -> Iterable[bytes]:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # records were overwritten before we read them: skip ahead
                raise
            if not record:
                return
            entry = parse_kmsg(record, boot_time)
            if entry is not None:
                yield json.dumps(entry).encode() + b"\n"

    async def _send_lines(self) -> None:
        failures = 0
        while True:
            if not self._lines or not self.sinks.kernel_logs:
                self._wake_lines.clear()
                await self._wake_lines.wait()
                continue
            sink = self.sinks.kernel_logs
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*sink), 5)
            except (OSError, TimeoutError, ValueError) as exc:
                # ValueError: a host name the resolver refuses (a label over 63 characters).
                log.debug("telemetry: log sink not reachable: %s", exc)
                failures += 1
                await self._backoff(failures)
                continue
            opened = time.monotonic()
            try:
                await self._pump_lines(sink, reader, writer)
            except (OSError, ConnectionError) as exc:
                log.debug("telemetry: log sink connection lost: %s", exc)
            finally:
                # Lines still buffered for a sink that stopped reading would hold close() (and
                # the agent's shutdown) until it reads: such a connection is dropped instead.
                if writer.transport.get_write_buffer_size():
                    writer.transport.abort()
                else:
                    writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)
            # A sink that closes every connection at once (one refusing us, or not a log
            # sink) costs a retry like one that cannot be reached, not a connection per line.
            if time.monotonic() - opened < SHORT_CONNECTION and self.sinks.kernel_logs == sink:
                failures += 1
                await self._backoff(failures)
            else:
                failures = 0

    async def _pump_lines(
        self, sink: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Send queued lines on one connection until the sink changes or closes it."""
        # The sink never writes: anything it does (EOF, above all: its idle timeout) ends the
        # connection. Watched while idle, so the next line goes on a new connection instead of
        # into a socket the far end has closed, where it would be lost without an error.
        ended = asyncio.ensure_future(reader.read(1))
        try:
            # at_eof(): the EOF has arrived but the read waiting for it has not run yet.
            while self.sinks.kernel_logs == sink and not ended.done() and not reader.at_eof():
                # Cleared before the queue is emptied, not after drain(): a line queued while
                # drain() waits (a backlog larger than the socket takes) sets it again. Cleared
                # after, that line would wait for the next one (for ever, on a quiet kernel).
                self._wake_lines.clear()
                while self._lines:
                    writer.write(self._lines[0])
                    self._lines.popleft()
                drained = asyncio.ensure_future(writer.drain())
                try:
                    await asyncio.wait(
                        {drained, ended}, timeout=DRAIN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    drained.cancel()
                if not drained.done():
                    if ended.done():
                        break
                    raise ConnectionError(
                        f"the log sink did not take the lines within {DRAIN_TIMEOUT:.0f} s"
                    )
                drained.result()  # a write error ends the connection (OSError)
                if self._lines:
                    continue
                woken = asyncio.ensure_future(self._wake_lines.wait())
                try:
                    await asyncio.wait({woken, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
            if ended.done():
                log.debug("telemetry: the log sink ended the connection")
        finally:
            ended.cancel()
            if ended.done() and not ended.cancelled():
                ended.exception()  # a reset is an end like EOF: retrieved, so not reported
