"""Events and machine logs in a PostgreSQL registry, shared by every server of the fleet.

The tables (`telemetry_events`, `telemetry_logs`, schema version 3 in `pg_schema.py`) hold
each entry as the JSON line a journal would hold (text, not jsonb: the keys keep the order
the machine sent them in, and the CLI prints the same whichever store it reads), with the
columns the readers and the retention filter on. Writes come from the server's telemetry
writer thread (`telemetry.TelemetryQueue`), one transaction per batch, on a connection of
their own, so telemetry never waits behind Provision's registry calls or the other way round.

Writers take a transaction-level advisory lock before inserting: `seq` is then assigned in
commit order across every server, and `gatekeeper events --follow` (which reads `seq > last`)
cannot skip a row another server committed late.

Retention runs in the store: rows older than the maximum age are deleted, and the newest
rows are kept up to the size limit, per machine for logs and in all for events. Every server
applies its own flags to the shared tables: give every instance the same ones.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from gatekeeper.server import pg_schema
from gatekeeper.server.journal import entry_time
from gatekeeper.server.registry import RegistryError
from gatekeeper.server.telemetry import Batch, Retention

# pg_advisory_xact_lock key for telemetry inserts ("gk" in the top bytes).
_INSERT_LOCK = 0x676B_0000_0003
# Size limits are applied to what was written, at most this often.
TRIM_EVERY = 1.0
READ_ROWS = 5_000


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def connect(
    conninfo: str,
    password: str | None,
    *,
    connect_timeout: float = 3.0,
    statement_timeout: float = 5.0,
) -> psycopg.Connection[tuple[Any, ...]]:
    kwargs: dict[str, Any] = {
        "connect_timeout": max(1, round(connect_timeout)),
        "autocommit": True,
        "application_name": "gatekeeper-telemetry",
        "options": f"-c statement_timeout={int(statement_timeout * 1000)} "
        f"-c lock_timeout={int(statement_timeout * 1000)}",
    }
    if password is not None:
        kwargs["password"] = password
    return psycopg.connect(conninfo, **kwargs)


def _as_text(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


class PostgresTelemetry:
    """The backend a server writes through (from its writer thread only)."""

    def __init__(
        self,
        conninfo: str,
        *,
        shown: str,
        retention: Retention,
        password: str | None = None,
    ) -> None:
        self.shown = shown
        self.retention = retention
        self._conninfo = conninfo
        self._password = password
        self._db: psycopg.Connection[tuple[Any, ...]] | None = None
        self._touched: set[str] = set()
        self._events_touched = False
        self._trimmed = 0.0

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._db is None or self._db.closed or self._db.broken:
            self._drop()
            try:
                self._db = connect(self._conninfo, self._password)
            except psycopg.Error as exc:
                raise RegistryError(
                    f"the registry {self.shown} is unreachable: {_line(exc)}"
                ) from None
        return self._db

    def _drop(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
        self._db = None

    def write(self, batches: list[Batch]) -> None:
        now = time.time()
        events: list[tuple[float, str, str]] = []
        logs: list[tuple[str, float, int, str]] = []
        for batch in batches:
            for entry in batch.entries:
                text = _as_text(entry)
                received = entry_time(entry) or now
                if batch.kind == "events":
                    events.append((received, str(entry.get("machine", "")), text))
                else:
                    logs.append((batch.name, received, len(text.encode()), text))
        db = self._connection()
        try:
            with db.transaction(), db.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_INSERT_LOCK,))
                if events:
                    with cur.copy(
                        "COPY telemetry_events (received, node_uuid, entry) FROM STDIN"
                    ) as copy:
                        for row in events:
                            copy.write_row(row)
                if logs:
                    with cur.copy(
                        "COPY telemetry_logs (machine_key, received, bytes, entry) FROM STDIN"
                    ) as copy:
                        for log_row in logs:
                            copy.write_row(log_row)
        except psycopg.Error as exc:
            if db.broken or db.closed or isinstance(exc, psycopg.OperationalError):
                self._drop()
            raise RegistryError(f"registry {self.shown}: {_line(exc)}") from None
        self._touched.update(b.name for b in batches if b.kind == "logs")
        self._events_touched = self._events_touched or bool(events)
        if time.monotonic() - self._trimmed >= TRIM_EVERY:
            self._trim()

    def _trim(self) -> None:
        """Keep the newest rows up to the size limits, where something was written."""
        self._trimmed = time.monotonic()
        db = self._connection()
        try:
            with db.transaction(), db.cursor() as cur:
                for key in sorted(self._touched):
                    cur.execute(
                        "DELETE FROM telemetry_logs WHERE machine_key = %(key)s AND seq <= ("
                        " SELECT seq FROM (SELECT seq, sum(bytes) OVER (ORDER BY seq DESC) AS upto"
                        "  FROM telemetry_logs WHERE machine_key = %(key)s) newest"
                        " WHERE upto > %(max)s ORDER BY seq DESC LIMIT 1)",
                        {"key": key, "max": self.retention.logs_max_bytes},
                    )
                if self._events_touched:
                    cur.execute(
                        "DELETE FROM telemetry_events WHERE seq <= ("
                        " SELECT seq FROM (SELECT seq, sum(bytes) OVER (ORDER BY seq DESC) AS upto"
                        "  FROM (SELECT seq, octet_length(entry) AS bytes FROM telemetry_events)"
                        "  sized) newest WHERE upto > %(max)s ORDER BY seq DESC LIMIT 1)",
                        {"max": self.retention.events_max_bytes},
                    )
        except psycopg.Error as exc:
            if db.broken or db.closed:
                self._drop()
            raise RegistryError(f"registry {self.shown}: {_line(exc)}") from None
        self._touched.clear()
        self._events_touched = False

    def sweep(self, now: float) -> None:
        ages = (
            ("telemetry_logs", self.retention.logs_max_age),
            ("telemetry_events", self.retention.events_max_age),
        )
        if all(age is None for _, age in ages) and not self._touched:
            return
        db = self._connection()
        try:
            for table, age in ages:
                if age is not None:
                    # Table names from the tuple above, never from input.
                    db.execute(f"DELETE FROM {table} WHERE received < %s", (now - age,))
        except psycopg.Error as exc:
            if db.broken or db.closed:
                self._drop()
            raise RegistryError(f"registry {self.shown}: {_line(exc)}") from None
        if self._touched or self._events_touched:
            self._trim()

    def close(self) -> None:
        self._drop()


class PostgresTelemetryReader:
    """What `gatekeeper events` / `gatekeeper logs` read from a PostgreSQL registry."""

    def __init__(self, conninfo: str, *, shown: str, password: str | None = None) -> None:
        self.shown = shown
        try:
            self._db = connect(conninfo, password)
        except psycopg.Error as exc:
            raise RegistryError(f"the registry {shown} is unreachable: {_line(exc)}") from None
        try:
            with self._db.cursor() as cur:
                pg_schema.check_version(cur, shown)
                if pg_schema.version(cur) < pg_schema.TELEMETRY_VERSION:
                    raise RegistryError(
                        f"the registry {shown} holds no events or logs yet (schema version "
                        f"{pg_schema.version(cur)}): start a server of this version on it"
                    )
        except BaseException:
            self.close()
            raise

    def _rows(
        self, table: str, where: str, params: dict[str, Any], follow: bool, poll: float
    ) -> Iterator[dict[str, Any]]:
        last = 0
        while True:
            try:
                rows = self._db.execute(
                    f"SELECT seq, entry FROM {table} WHERE seq > %(last)s {where} "
                    "ORDER BY seq LIMIT %(limit)s",
                    {**params, "last": last, "limit": READ_ROWS},
                ).fetchall()
            except psycopg.Error as exc:
                raise RegistryError(f"registry {self.shown}: {_line(exc)}") from None
            for seq, text in rows:
                last = int(seq)
                try:
                    doc = json.loads(text)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    yield doc
            if len(rows) == READ_ROWS:
                continue
            if not follow:
                return
            time.sleep(poll)

    def events(
        self,
        *,
        machine: str | None = None,
        since: float | None = None,
        follow: bool = False,
        poll: float = 0.5,
    ) -> Iterator[dict[str, Any]]:
        where, params = _since(since)
        if machine is not None:
            where += " AND lower(node_uuid) = %(machine)s"
            params["machine"] = machine.lower()
        return self._rows("telemetry_events", where, params, follow, poll)

    def has_logs(self, machine_key: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM telemetry_logs WHERE machine_key = %s LIMIT 1", (machine_key,)
        ).fetchone()
        return row is not None

    def logs(
        self,
        machine_key: str,
        *,
        since: float | None = None,
        follow: bool = False,
        poll: float = 0.5,
    ) -> Iterator[dict[str, Any]]:
        where, params = _since(since)
        where += " AND machine_key = %(key)s"
        params["key"] = machine_key
        return self._rows("telemetry_logs", where, params, follow, poll)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._db.close()


def _since(since: float | None) -> tuple[str, dict[str, Any]]:
    if since is None:
        return "", {}
    return " AND received >= %(cutoff)s", {"cutoff": time.time() - since}
