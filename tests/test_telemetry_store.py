"""The telemetry store on a real PostgreSQL: what two servers wrote is read back through the
CLI, retention by age and size runs in the store, and a PostgreSQL that stops neither blocks
nor grows the writer: it holds what fits, drops the rest with one line, resumes when back."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgcluster import PgCluster

from gatekeeper.overlay import overlay_prefix
from gatekeeper.server.audit import rfc3339
from gatekeeper.server.pg_registry import PostgresRegistry
from gatekeeper.server.pg_telemetry import PostgresTelemetry
from gatekeeper.server.registry import MachineRecord, machine_key
from gatekeeper.server.telemetry import Retention, TelemetryQueue

RETENTION = Retention(logs_max_bytes=2 << 20, events_max_bytes=16 << 20)
UUIDS = ("4c4c4544-0000-4000-8000-00000000000a", "4c4c4544-0000-4000-8000-00000000000b")


def machine(n: int) -> MachineRecord:
    address = overlay_prefix("")[0x100 + n]
    return MachineRecord(machine_key(UUIDS[n], None), UUIDS[n], address, f"pk{n}")


def log_line(n: int, msg: str, at: float | None = None) -> dict[str, Any]:
    return {"received": rfc3339(at or time.time()), "machine": UUIDS[n], "msg": msg}


def event(n: int, what: str, at: float | None = None) -> dict[str, Any]:
    return {"time": rfc3339(at or time.time()), "machine": UUIDS[n], "data": {"what": what}}


def cli(url: str, password_file: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "gatekeeper", *args,
            "--registry", url, "--registry-password-file", str(password_file),
            "--state-dir", str(tmp),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def rows(url: str, table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(f"SELECT machine_key, entry FROM {table} ORDER BY seq").fetchall()


def test_what_two_servers_stored_is_read_through_the_registry(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path
) -> None:
    registry = PostgresRegistry(pg_url, shown=pg_url)  # migrates, as a server does at start
    try:
        for n in (0, 1):
            registry.claim(machine(n))
    finally:
        registry.close()
    # Two servers: each its own backend and writer thread, one shared registry.
    queues = [
        TelemetryQueue(PostgresTelemetry(pg_url, shown=pg_url, retention=RETENTION))
        for _ in range(2)
    ]
    try:
        for n, queue in enumerate(queues):
            queue.sink("events").append("events", [event(n, f"up through server {n}")])
            queue.sink("logs").append(
                machine(n).machine_key, [log_line(n, f"line {i} via {n}") for i in range(3)]
            )
        assert all(q.flush() for q in queues)
    finally:
        for queue in queues:
            queue.close()
    pw = pg_cluster.password_file

    listed = cli(pg_url, pw, tmp_path, "events", "--json")
    assert listed.returncode == 0, listed.stderr
    whats = sorted(json.loads(x)["data"]["what"] for x in listed.stdout.splitlines())
    assert whats == ["up through server 0", "up through server 1"]
    one = cli(pg_url, pw, tmp_path, "events", "--machine", UUIDS[1].upper())
    assert one.stdout.count("\n") == 1 and "server 1" in one.stdout
    for n in (0, 1):
        logs = cli(pg_url, pw, tmp_path, "logs", UUIDS[n])
        assert logs.returncode == 0, logs.stderr
        assert [x.split(": ", 1)[1] for x in logs.stdout.splitlines()] == [
            f"line {i} via {n}" for i in range(3)
        ]
    assert cli(pg_url, pw, tmp_path, "logs", UUIDS[0], "--since", "1h").stdout.count("\n") == 3
    unknown = cli(pg_url, pw, tmp_path, "logs", "4c4c4544-0000-4000-8000-0000000000ff")
    assert unknown.returncode == 1
    assert unknown.stderr == (
        "gatekeeper logs: no machine with UUID '4c4c4544-0000-4000-8000-0000000000ff' "
        "and no logs from one\n"
    )


def test_follow_prints_what_arrives_later(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path
) -> None:
    PostgresRegistry(pg_url, shown=pg_url).close()
    queue = TelemetryQueue(PostgresTelemetry(pg_url, shown=pg_url, retention=RETENTION))
    follow = subprocess.Popen(
        [
            sys.executable, "-m", "gatekeeper", "events", "--follow", "--json",
            "--registry", pg_url, "--registry-password-file", str(pg_cluster.password_file),
            "--state-dir", str(tmp_path),
        ],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # the reader has started and found nothing yet
        queue.sink("events").append("events", [event(0, "later")])
        assert queue.flush()
        assert follow.stdout is not None
        line = follow.stdout.readline()
        assert json.loads(line)["data"] == {"what": "later"}
    finally:
        follow.terminate()
        follow.wait(5)
        queue.close()


def test_retention_by_size_per_machine_and_by_age(pg_url: str) -> None:
    PostgresRegistry(pg_url, shown=pg_url).close()
    now = time.time()
    retention = Retention(
        logs_max_bytes=2000, events_max_bytes=1 << 20, logs_max_age=3600, events_max_age=60
    )
    backend = PostgresTelemetry(pg_url, shown=pg_url, retention=retention)
    queue = TelemetryQueue(backend, retention=retention)
    try:
        logs = queue.sink("logs")
        key0, key1 = machine(0).machine_key, machine(1).machine_key
        for i in range(100):  # about 100 bytes a line: 10,000 bytes for machine 0
            logs.append(key0, [log_line(0, f"{i:04d} " + "x" * 40)])
        logs.append(key1, [log_line(1, "old", at=now - 7200), log_line(1, "young")])
        events = queue.sink("events")
        events.append("events", [event(0, "stale", at=now - 120), event(0, "fresh")])
        assert queue.flush()
        backend.sweep(time.time())
    finally:
        queue.close()
    kept = [(k, json.loads(e)["msg"]) for k, e in rows(pg_url, "telemetry_logs")]
    mine = [m for k, m in kept if k == key0]
    sizes = [len(e.encode()) for k, e in rows(pg_url, "telemetry_logs") if k == key0]
    # The newest lines up to the limit, the oldest gone; the other machine's untouched by it.
    assert 2000 - max(sizes) < sum(sizes) <= 2000 and mine[-1].startswith("0099") and len(mine) < 30
    assert [int(m[:4]) for m in mine] == list(range(100 - len(mine), 100))
    assert [m for k, m in kept if k == key1] == ["young"]
    with psycopg.connect(pg_url) as db:
        stored = db.execute("SELECT entry FROM telemetry_events ORDER BY seq").fetchall()
    assert [json.loads(e)["data"]["what"] for (e,) in stored] == ["fresh"]


def test_postgresql_stopped_holds_what_fits_drops_the_rest_and_resumes(
    own_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PGPASSWORD", own_cluster.password)
    url = own_cluster.create_database()
    PostgresRegistry(url, shown=url).close()
    caplog.set_level(logging.WARNING, logger="gatekeeper.server.telemetry")
    drops: list[int] = []  # what the server counts in gatekeeper_telemetry_dropped_total
    queue = TelemetryQueue(
        PostgresTelemetry(url, shown=url, retention=RETENTION),
        max_entries=100,
        retry_every=0.2,
        on_drop=drops.append,
    )
    try:
        logs = queue.sink("logs")
        key = machine(0).machine_key
        logs.append(key, [log_line(0, "before")])
        assert queue.flush()
        own_cluster.stop()
        started = time.monotonic()
        for i in range(300):  # what a flood of log lines does while the store is away
            logs.append(key, [log_line(0, f"during {i}")])
        # Never a wait on the store: 300 appends take no time at all.
        assert time.monotonic() - started < 0.5
        time.sleep(1)
        assert queue.dropped == sum(drops) == 200
        down = [r.getMessage() for r in caplog.records]
        assert len(down) == 1 and down[0].startswith("telemetry store unavailable (")
        assert "holding up to 100 events and log lines, dropping beyond that" in down[0]
        assert own_cluster.password not in down[0]
        own_cluster.start()
        assert queue.flush(30)
        logs.append(key, [log_line(0, "after")])
        assert queue.flush()
    finally:
        queue.close()
    msgs = [json.loads(e)["msg"] for _, e in rows(url, "telemetry_logs")]
    assert msgs == ["before", *(f"during {i}" for i in range(100)), "after"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[1:] == [
        "telemetry store back: 200 events and log lines were dropped while it was away"
    ]


def test_cli_says_in_one_line_when_the_registry_cannot_answer(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path
) -> None:
    pw = pg_cluster.password_file
    gone = f"postgresql://gatekeeper@/gk?host={tmp_path}/no-such-socket-dir"
    for args in (("events",), ("logs", UUIDS[0])):
        done = cli(gone, pw, tmp_path, *args)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith(f"gatekeeper {args[0]}: the registry {gone} is unreachable")
        assert done.stderr.count("\n") == 1 and pg_cluster.password not in done.stderr
    # A registry written by a gatekeeper from before events and logs were stored there.
    PostgresRegistry(pg_url, shown=pg_url).close()
    with psycopg.connect(pg_url) as db:
        db.execute("UPDATE gatekeeper_schema SET version = 1")
    old = cli(pg_url, pw, tmp_path, "events")
    assert old.returncode == 1
    assert old.stderr == (
        f"gatekeeper events: the registry {pg_url} holds no events or logs yet (schema version "
        "1): start a server of this version on it\n"
    )
