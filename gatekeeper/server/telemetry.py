"""The telemetry store: where a server keeps the events and machine logs it receives.

One narrow interface, two backends (docs/registry.md, "Events and machine logs"):

- `JournalTelemetry`: bounded JSON-lines journals in the server's state directory
  (`journal.py`), the default, read by `gatekeeper events` / `gatekeeper logs` from there;
- `PostgresTelemetry` (`pg_telemetry.py`): tables in a PostgreSQL registry, shared by every
  server of the fleet, so what any instance received is readable through the registry.

The receivers (`events.py`, `logreceiver.py`) never write to a backend themselves: they hand
entries to a `TelemetryQueue`, which returns at once and writes from its own thread, in
batches. A backend that is slow or away (PostgreSQL stopped) therefore never holds the event
loop that also carries tunnelled traffic. The queue is bounded (entries and bytes): entries
that do not fit are dropped and counted, with one log line per episode, never a growing
buffer; while the backend is away the queue holds what fits and writes it when it is back.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from gatekeeper.server.journal import Journal

log = logging.getLogger(__name__)

Kind = Literal["events", "logs"]

# What one server holds in memory for a backend that is behind or away: at most this many
# entries and (estimated) bytes. Past either, new entries are dropped and counted.
MAX_QUEUED_ENTRIES = 50_000
MAX_QUEUED_BYTES = 32 << 20
# One write (one transaction, or one file append per journal) takes at most this many.
BATCH_ENTRIES = 2_000
# While the backend fails, how long the writer waits before trying again.
RETRY_EVERY = 1.0
SAY_BEHIND_EVERY = 60.0


@dataclass(frozen=True)
class Retention:
    """The limits a store keeps (the server's --logs-max-* and --events-max-* flags).

    `logs_max_bytes` is per machine, `events_max_bytes` for all events together; an age of
    None means size only.
    """

    logs_max_bytes: int
    events_max_bytes: int
    logs_max_age: float | None = None
    events_max_age: float | None = None

    def sweep_every(self) -> float:
        """How often ages are applied: a small part of the shortest, at most a minute."""
        ages = [a for a in (self.logs_max_age, self.events_max_age) if a is not None]
        return max(0.5, min(60.0, min(ages) / 4)) if ages else 60.0


@dataclass(frozen=True)
class Batch:
    kind: Kind
    # The machine key for logs (never a name a machine chose), events.EVENTS_JOURNAL for events.
    name: str
    entries: list[dict[str, Any]]


class TelemetryBackend(Protocol):
    """Where entries end up; called from the queue's writer thread only."""

    def write(self, batches: list[Batch]) -> None:
        """Store every entry of `batches`, or raise (then nothing of them counts as stored)."""

    def sweep(self, now: float) -> None:
        """Apply the store's retention limits."""

    def close(self) -> None: ...


class TelemetrySink(Protocol):
    """What a receiver is given: `append` returns at once (journal.Journal fits as well)."""

    def append(self, name: str, entries: list[dict[str, Any]]) -> None: ...


def estimated_bytes(entry: dict[str, Any]) -> int:
    """About what an entry holds, cheaply: its strings, and nested values as JSON."""
    total = 64
    for key, value in entry.items():
        total += len(key)
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, dict | list):
            total += len(json.dumps(value))
        else:
            total += 16
    return total


class TelemetryQueue:
    """Bounded hand-off from the receivers (on the loop) to a backend (on a thread)."""

    def __init__(
        self,
        backend: TelemetryBackend,
        *,
        retention: Retention | None = None,
        max_entries: int = MAX_QUEUED_ENTRIES,
        max_bytes: int = MAX_QUEUED_BYTES,
        retry_every: float = RETRY_EVERY,
        on_drop: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.retry_every = retry_every
        self.on_drop = on_drop
        self.clock = clock
        self.sweep_every = retention.sweep_every() if retention is not None else 60.0
        # Entries dropped so far (the metric and the log lines below say how many).
        self.dropped = 0
        self._pending: collections.deque[tuple[Batch, int]] = collections.deque()
        self._pending_entries = 0
        self._pending_bytes = 0
        self._writing = False
        self._dropped_said = 0
        self._said_at = float("-inf")
        self._cond = threading.Condition()
        self._stop = False
        self._failing: str | None = None
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self._thread.start()

    def sink(self, kind: Kind) -> _Sink:
        return _Sink(self, kind)

    def put(self, kind: Kind, name: str, entries: list[dict[str, Any]]) -> bool:
        """Queue entries for writing; False (and counted as dropped) when they do not fit."""
        if not entries:
            return True
        size = sum(estimated_bytes(e) for e in entries)
        with self._cond:
            if (
                self._pending_entries + len(entries) > self.max_entries
                or self._pending_bytes + size > self.max_bytes
            ):
                self.dropped += len(entries)
                if self.on_drop is not None:
                    self.on_drop(len(entries))
                # Said by the writer, which knows whether the store is slow or away.
                return False
            self._pending.append((Batch(kind, name, entries), size))
            self._pending_entries += len(entries)
            self._pending_bytes += size
            self._cond.notify()
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued is written (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _head(self) -> list[tuple[Batch, int]]:
        """The first queued batches that together stay within BATCH_ENTRIES (at least one)."""
        out: list[tuple[Batch, int]] = []
        count = 0
        for batch, size in self._pending:
            if out and count + len(batch.entries) > BATCH_ENTRIES:
                break
            out.append((batch, size))
            count += len(batch.entries)
        return out

    def _run(self) -> None:
        next_sweep = self.clock() + self.sweep_every
        retry_at = 0.0
        while True:
            with self._cond:
                # New entries wake the writer, except while it waits to retry a failed write.
                while not self._stop:
                    now = self.clock()
                    if self._pending and now >= retry_at:
                        break
                    wait = min(next_sweep, retry_at if self._pending else next_sweep) - now
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stop and not self._pending:
                    return
                # Left in the queue (and counted against its bound) until written: while the
                # backend is away, the entries dropped are the new ones beyond the bound.
                head = self._head()
                self._writing = bool(head)
            if head:
                written = self._write([batch for batch, _ in head])
                with self._cond:
                    self._writing = False
                    if written:
                        for _, size in head:
                            batch, _ = self._pending.popleft()
                            self._pending_entries -= len(batch.entries)
                            self._pending_bytes -= size
                    self._cond.notify_all()
                if written:
                    self._say_behind()
                if not written:
                    if self._stop:
                        return
                    retry_at = self.clock() + self.retry_every
                    continue
            if self.clock() >= next_sweep:
                next_sweep = self.clock() + self.sweep_every
                self._sweep()

    def _say_behind(self) -> None:
        """A store that is up but cannot keep up: a line a minute at most, with the count
        (an outage has its own lines)."""
        new = self.dropped - self._dropped_said
        if new and self.clock() - self._said_at >= SAY_BEHIND_EVERY:
            self._said_at = self.clock()
            self._dropped_said = self.dropped
            log.warning(
                "telemetry store is behind: %d events and log lines dropped (it holds %d at "
                "most while writing)",
                new,
                self.max_entries,
            )

    def _write(self, batches: list[Batch]) -> bool:
        return self._attempt(lambda: self.backend.write(batches))

    def _sweep(self) -> None:
        # While the store is away its retention waits too (one line said so already).
        self._attempt(lambda: self.backend.sweep(time.time()))

    def _attempt(self, op: Callable[[], None]) -> bool:
        """Run a backend call; an outage is one line when it starts and one when it ends."""
        try:
            op()
        except Exception as exc:  # the writer outlives any backend failure
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if self._failing is None:
                self._failing = reason
                log.warning(
                    "telemetry store unavailable (%s): holding up to %d events and log lines, "
                    "dropping beyond that, until it is back",
                    reason,
                    self.max_entries,
                )
            return False
        if self._failing is not None:
            log.warning(
                "telemetry store back: %d events and log lines were dropped while it was away",
                self.dropped - self._dropped_said,
            )
            self._failing = None
            self._dropped_said = self.dropped
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most `timeout`), then stop and close the backend."""
        self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self.backend.close()


class _Sink:
    def __init__(self, queue: TelemetryQueue, kind: Kind) -> None:
        self._queue = queue
        self._kind = kind

    def append(self, name: str, entries: list[dict[str, Any]]) -> None:
        self._queue.put(self._kind, name, entries)


class JournalTelemetry:
    """The state-directory backend: one journal directory for events, one for logs."""

    def __init__(self, events_dir: Path, logs_dir: Path, retention: Retention) -> None:
        # Two files of half the limit each (see journal.py).
        self.events = Journal(
            events_dir,
            max_bytes=max(1, retention.events_max_bytes // 2),
            max_age=retention.events_max_age,
        )
        self.logs = Journal(
            logs_dir,
            max_bytes=max(1, retention.logs_max_bytes // 2),
            max_age=retention.logs_max_age,
        )

    def write(self, batches: list[Batch]) -> None:
        for batch in batches:
            journal = self.events if batch.kind == "events" else self.logs
            journal.append(batch.name, batch.entries)

    def sweep(self, now: float) -> None:
        for journal in (self.events, self.logs):
            try:
                journal.sweep(now)
            except OSError as exc:
                log.warning("journal sweep in %s failed: %s", journal.directory, exc)

    def close(self) -> None:
        self.events.close()
        self.logs.close()
