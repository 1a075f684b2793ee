"""Instances, owners and the change feed on the registry (docs/registry.md, "Owners and
failover"): the rules in the store, on a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

import dataclasses
import ipaddress
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gatekeeper.server.instances import (
    check_instance_name,
    dead_here,
    may_take_over,
    survivor_endpoints,
)
from gatekeeper.server.registry import (
    ANYTHING,
    INSTANCE_STALE_AFTER,
    Changes,
    InstanceInUse,
    InstanceRecord,
    MachineRecord,
    Registry,
    parse_endpoints,
)
from gatekeeper.server.sqlite_registry import SqliteRegistry

NOW = 1_800_000_000.0


def instance(
    name: str, seen: float | None = None, *, run: str = "", started: float = 0.0
) -> InstanceRecord:
    """`seen`: the caller's clock (now, unless given); the store decides staleness on its
    own clock, so tests make a row old with `age`."""
    return InstanceRecord(
        name,
        (f"[2001:db8::{len(name)}]:51820",),
        run or f"run-{name}",
        started,
        time.time() if seen is None else seen,
    )


def age(registry: Registry, name: str, seconds: float = INSTANCE_STALE_AFTER + 1) -> None:
    """Make an instance's last heartbeat `seconds` older, in the store itself."""
    if isinstance(registry, SqliteRegistry):
        with registry._locked() as db:
            db.execute("UPDATE instances SET seen = seen - ? WHERE name = ?", (seconds, name))
        return
    url = registry._conninfo  # type: ignore[attr-defined]
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("UPDATE instances SET seen = seen - %s WHERE name = %s", (seconds, name))


def machine(n: int, owner: str | None) -> MachineRecord:
    return MachineRecord(
        machine_key=f"key-{n}",
        node_uuid=f"uuid-{n}",
        address=ipaddress.IPv6Address(f"fdae:41e4:649b:9303::{n:x}"),
        public_key=f"{n:043d}=",
        owner=owner,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "sqlite":
        with SqliteRegistry(tmp_path) as reg:
            yield reg
        return
    url = request.getfixturevalue("pg_url")
    from gatekeeper.server.pg_registry import PostgresRegistry

    shared = PostgresRegistry(url, shown=url)
    try:
        yield shared
    finally:
        shared.close()


def owners(reg: Registry) -> dict[str, str | None]:
    return {m.machine_key: m.owner for m in reg.machines()}


def test_a_live_name_is_refused_to_another_process_and_free_once_stale(registry: Registry) -> None:
    registry.heartbeat(instance("srv1", run="first"), take_over=False)
    with pytest.raises(InstanceInUse) as refused:
        registry.heartbeat(instance("srv1", run="second"), take_over=False)
    assert str(refused.value) == (
        "another server runs as instance 'srv1' on this registry (its heartbeat is less than "
        "15 s old): give each server its own --instance"
    )
    # The same process beats again as often as it likes.
    registry.heartbeat(instance("srv1", run="first"), take_over=False)
    # Its writer died: once the row is stale the name is free.
    age(registry, "srv1")
    rows = registry.heartbeat(instance("srv1", run="second"), take_over=False)
    assert [(r.name, r.run_id) for r in rows] == [("srv1", "second")]


def test_take_over_moves_exactly_the_machines_no_live_instance_owns(registry: Registry) -> None:
    registry.heartbeat(instance("srv1"), take_over=False)
    registry.heartbeat(instance("srv2"), take_over=False)
    registry.heartbeat(instance("srv3"), take_over=False)
    for n, owner in enumerate(("srv1", "srv2", "srv3", None, "renamed"), start=1):
        registry.claim(machine(n, owner))
    age(registry, "srv1")  # srv1 stopped writing; srv2 and srv3 live on
    # Without take_over (not healthy long enough yet) nothing moves.
    registry.heartbeat(instance("srv3"), take_over=False)
    assert owners(registry)["key-1"] == "srv1"
    registry.heartbeat(instance("srv3"), take_over=True)
    assert owners(registry) == {
        "key-1": "srv3",  # srv1 went stale
        "key-2": "srv2",  # live: kept
        "key-3": "srv3",
        "key-4": "srv3",  # written before owners
        "key-5": "srv3",  # an instance no row names
    }


def test_leaving_frees_the_name_and_hands_the_machines_over(registry: Registry) -> None:
    registry.heartbeat(instance("srv1", run="a"), take_over=False)
    registry.heartbeat(instance("srv2"), take_over=False)
    registry.claim(machine(1, "srv1"))
    registry.leave(instance("srv1", run="a"))
    registry.heartbeat(instance("srv1", run="b"), take_over=False)  # no wait
    registry.leave(instance("srv1", run="b"))
    registry.heartbeat(instance("srv2"), take_over=True)
    assert owners(registry) == {"key-1": "srv2"}


def test_set_owner_says_whether_anything_changed(registry: Registry) -> None:
    registry.claim(machine(1, "srv1"))
    assert registry.set_owner("key-1", "srv2") is True
    assert registry.set_owner("key-1", "srv2") is False
    assert registry.set_owner("key-nobody", "srv2") is False
    assert owners(registry) == {"key-1": "srv2"}


def test_the_change_feed_names_what_changed_even_from_another_process(
    registry: Registry,
) -> None:
    feed = registry.change_feed()
    key1 = machine(1, "srv1").public_key
    try:
        assert feed.wait(1.0) == ANYTHING  # the first wait: read everything once
        assert feed.wait(0.5) is None  # quiet
        registry.claim(machine(1, "srv1"))
        assert feed.wait(2.0) == Changes(frozenset({key1}))
        assert feed.wait(0.3) is None
        registry.update_endpoints({"key-1": "[2001:db8::7]:51820"})
        assert feed.wait(0.5) is None  # an endpoint update moves no peer
        # A re-key names both keys: the old peer goes, the new one comes.
        rekeyed = dataclasses.replace(machine(1, "srv1"), public_key=f"{7:043d}=")
        registry.claim(rekeyed)
        assert feed.wait(2.0) == Changes(frozenset({key1, rekeyed.public_key}))
        woke: list[tuple[float, Changes | None]] = []
        started = time.monotonic()
        waiter = threading.Thread(target=lambda: woke.append((time.monotonic(), feed.wait(5.0))))
        waiter.start()
        time.sleep(0.3)
        _remove_elsewhere(registry, "key-1")
        waiter.join(10)
        assert woke and woke[0][1] == Changes(frozenset({rekeyed.public_key})), woke
        print(f"woke {woke[0][0] - started - 0.3:.3f} s after another process's removal")
    finally:
        feed.close()


def test_a_sqlite_feed_that_fell_behind_the_pruned_log_reads_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SqliteRegistry(tmp_path) as reg:
        feed = reg.change_feed()
        try:
            assert feed.wait(1.0) == ANYTHING
            reg.claim(machine(1, "srv1"))
            assert feed.wait(1.0) == Changes(frozenset({machine(1, "srv1").public_key}))
            # Another process pruned entries this reader had not seen yet.
            for n in range(2, 6):
                reg.claim(machine(n, "srv1"))
            reg._db.execute(
                "DELETE FROM machine_change_log WHERE seq < (SELECT MAX(seq) FROM "
                "machine_change_log)"
            )
            assert feed.wait(1.0) == ANYTHING
            reg.claim(machine(9, "srv1"))
            assert feed.wait(1.0) == Changes(frozenset({machine(9, "srv1").public_key}))
            # More changes at once than are worth naming: read everything.
            monkeypatch.setattr(feed, "MAX_KEYS", 3)
            for n in range(10, 15):
                reg.claim(machine(n, "srv1"))
            assert feed.wait(1.0) == ANYTHING
            assert feed.wait(0.3) is None
        finally:
            feed.close()


def test_the_sqlite_change_log_keeps_its_size_bounded(tmp_path: Path) -> None:
    from gatekeeper.server.sqlite_registry import LOG_KEEP

    with SqliteRegistry(tmp_path) as reg:
        reg.claim(machine(1, "srv1"))
        for n in range(LOG_KEEP + 2500):
            reg.set_owner("key-1", f"srv{n % 2}")
        (count,) = reg._db.execute("SELECT COUNT(*) FROM machine_change_log").fetchone()
        assert LOG_KEEP <= count <= LOG_KEEP + 1000


def _remove_elsewhere(registry: Registry, key: str) -> None:
    """The removal from a separate process, as `gatekeeper machines remove` on another host."""
    if isinstance(registry, SqliteRegistry):
        code = (
            "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
            "db.execute('DELETE FROM machines WHERE machine_key = ?', (sys.argv[2],)); db.commit()"
        )
        target = str(registry.path)
    else:
        code = (
            "import psycopg, sys; db = psycopg.connect(sys.argv[1], autocommit=True); "
            "db.execute('DELETE FROM machines WHERE machine_key = %s', (sys.argv[2],))"
        )
        target = registry._conninfo  # type: ignore[attr-defined]
    subprocess.run([sys.executable, "-c", code, target, key], check=True, timeout=30)


def test_survivors_are_listed_oldest_first_without_the_dead_or_ourselves() -> None:
    fleet = [
        instance("me", NOW, started=1.0),
        instance("young", NOW, started=30.0),
        instance("old", NOW, started=10.0),
        instance("dead", NOW - INSTANCE_STALE_AFTER - 1, started=0.0),
    ]
    assert survivor_endpoints(fleet, "me", NOW) == ("[2001:db8::3]:51820", "[2001:db8::5]:51820")


def test_take_over_waits_for_a_healthy_window() -> None:
    assert not may_take_over(None, NOW)
    assert not may_take_over(NOW - INSTANCE_STALE_AFTER, NOW)
    assert may_take_over(NOW - INSTANCE_STALE_AFTER - 0.1, NOW)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 64, "srv\n1", "münchen/1"])
def test_instance_names_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        check_instance_name(bad)
    assert check_instance_name("eu-west.1_a") == "eu-west.1_a"


def test_a_dead_predecessor_on_this_host_is_replaced_at_once(registry: Registry) -> None:
    registry.heartbeat(instance("srv1", run="host:1:a"), take_over=False)
    with pytest.raises(InstanceInUse) as refused:
        registry.heartbeat(instance("srv1", run="host:2:b"), take_over=False)
    assert refused.value.holder == "host:1:a"
    rows = registry.heartbeat(
        instance("srv1", run="host:2:b"), take_over=False, replaces="host:1:a"
    )
    assert [r.run_id for r in rows] == ["host:2:b"]


def test_which_predecessors_count_as_dead_here() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    other = subprocess.Popen(["sleep", "30"])  # a live process that is not gatekeeper
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "gatekeeper"])
    try:
        # Until the children have called exec, /proc shows our own command line for them.
        for proc, word in ((other, b"sleep"), (server, b"gatekeeper")):
            deadline = time.monotonic() + 10
            while word not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                assert time.monotonic() < deadline, "the child never started"
                time.sleep(0.01)
        here = {"host": "h", "pidns": "7"}
        assert dead_here(f"h:7:{gone.pid}:x", **here)
        assert dead_here(f"h:7:{other.pid}:x", **here)  # its PID was reused
        assert not dead_here(f"h:7:{server.pid}:x", **here)  # alive: wait for it
        assert not dead_here(f"elsewhere:7:{gone.pid}:x", **here)  # another host's
        assert not dead_here(f"h:8:{gone.pid}:x", **here)  # another PID namespace's
        for garbage in ("garbage", "h:7:²:x", "h:7:-1:x", "h:7:99999999999999999999:x"):
            assert not dead_here(garbage, **here)
    finally:
        for proc in (other, server):
            proc.kill()
            proc.wait()


def test_heartbeats_and_endpoint_updates_do_not_wake_the_sqlite_feed(tmp_path: Path) -> None:
    # At 10,000 machines a pass reads every record: a wake-up per heartbeat (every 5 s) cost
    # the idle server a fifth of a core before the feed counted machine changes only.
    with SqliteRegistry(tmp_path) as reg:
        reg.claim(machine(1, "srv1"))
        feed = reg.change_feed()
        try:
            assert feed.wait(1.0) == ANYTHING
            reg.heartbeat(instance("srv1"), take_over=False)
            reg.update_endpoints({"key-1": "[2001:db8::7]:51820"})
            reg.record_conflict("key-1", NOW, "[2001:db8::8]:1")
            assert feed.wait(0.6) is None
            reg.set_owner("key-1", "srv2")
            assert feed.wait(1.0) == Changes(frozenset({machine(1, "srv1").public_key}))
        finally:
            feed.close()


@pytest.mark.parametrize(
    ("stored", "endpoints"),
    [
        (
            '["[2001:db8::1]:51820", "203.0.113.9:51820"]',
            ("[2001:db8::1]:51820", "203.0.113.9:51820"),
        ),
        ('"[2001:db8::1]:51820"', ()),  # a string, not a list: not split into characters
        ("", ()),
        ("null", ()),
        ("{not json", ()),
        ('[1, null, "", "no-port", "[2001:db8::2]:1"]', ("[2001:db8::2]:1",)),
        (None, ()),
    ],
)
def test_another_instances_endpoints_are_read_defensively(
    stored: object, endpoints: tuple[str, ...]
) -> None:
    assert parse_endpoints(stored) == endpoints


def test_staleness_is_judged_on_the_stores_clock_not_the_callers(pg_url: str) -> None:
    # Two hosts whose clocks disagree by a minute (an NTP step on one): neither sees the
    # other as stale, and each gets the other's row back on its own clock.
    from gatekeeper.server.pg_registry import PostgresRegistry

    with PostgresRegistry(pg_url, shown=pg_url) as reg:
        ahead = time.time() + 60
        reg.heartbeat(instance("srv1"), take_over=False)
        reg.claim(machine(1, "srv1"))
        rows = reg.heartbeat(instance("srv2", ahead), take_over=True)
        assert owners(reg) == {"key-1": "srv1"}  # srv1 is not stale: nothing taken
        (one,) = [r for r in rows if r.name == "srv1"]
        assert one.live(ahead)
        assert survivor_endpoints(rows, "srv2", ahead) == one.endpoints


def test_instances_are_listed_read_only_on_the_callers_clock(registry: Registry) -> None:
    registry.heartbeat(instance("srv2"), take_over=False)
    registry.heartbeat(instance("srv1"), take_over=False)
    age(registry, "srv2")
    # On PostgreSQL a caller whose clock runs a minute ahead (another host) sees the same
    # ages; SQLite has one host, one clock.
    clocks = [time.time()] if isinstance(registry, SqliteRegistry) else [time.time() + 60]
    for now in [time.time(), *clocks]:
        listed = registry.instances(now)
        assert [i.name for i in listed] == ["srv1", "srv2"]
        one, two = listed
        assert one.live(now) and not two.live(now)
        assert (
            now - one.seen < 5 and INSTANCE_STALE_AFTER < now - two.seen < INSTANCE_STALE_AFTER + 5
        )
        assert one.endpoints == ("[2001:db8::4]:51820",)


def test_an_older_postgresql_registry_without_instances_lists_none(pg_url: str) -> None:
    # The same on PostgreSQL, read only: a read-only open does not migrate.
    from gatekeeper.server.pg_registry import PostgresRegistry

    with PostgresRegistry(pg_url, shown=pg_url) as reg:
        reg.heartbeat(instance("srv1"), take_over=False)
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("DROP TABLE instances CASCADE")
    with PostgresRegistry(pg_url, shown=pg_url, readonly=True) as reg:
        assert reg.instances(time.time()) == []


def test_an_older_sqlite_registry_without_instances_lists_none(tmp_path: Path) -> None:
    # A registry from before instances existed, opened read only (as `gatekeeper instances`
    # opens it): no instances, not an error about a missing table.
    with SqliteRegistry(tmp_path) as reg:
        reg.claim(machine(1, None))
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:
        db.execute("DROP TABLE instances")
    with SqliteRegistry(tmp_path, readonly=True) as reg:
        assert reg.instances(time.time()) == []


def test_machines_matching_reads_by_either_key_in_one_call(registry: Registry) -> None:
    for n in range(1, 6):
        registry.claim(machine(n, "srv1"))
    found = registry.machines_matching(
        machine_keys={"key-1", "key-2", "key-nobody"},
        public_keys={machine(2, None).public_key, machine(4, None).public_key, "x" * 44},
    )
    assert sorted(r.machine_key for r in found) == ["key-1", "key-2", "key-4"]
    assert registry.machines_matching() == []
    many = registry.machines_matching(machine_keys={f"key-{n}" for n in range(-2000, 3)})
    assert sorted(r.machine_key for r in many) == ["key-1", "key-2"]


def test_a_start_on_a_registry_with_the_first_release_trigger_makes_it_name_keys(
    pg_url: str,
) -> None:
    """A version-4 registry written before notifications named keys (empty payloads) gets the
    keyed trigger function from the next server start, with no version change."""
    from gatekeeper.server.pg_registry import PostgresRegistry

    with PostgresRegistry(pg_url, shown=pg_url) as reg:
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute(
                "CREATE OR REPLACE FUNCTION gatekeeper_machines_changed() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('gatekeeper_machines', ''); "
                "RETURN NULL; END $$"
            )
        feed = reg.change_feed()
        try:
            assert feed.wait(1.0) == ANYTHING
            reg.claim(machine(1, "srv1"))
            assert feed.wait(2.0) == ANYTHING  # an empty payload names nothing
        finally:
            feed.close()
    with PostgresRegistry(pg_url, shown=pg_url) as again:
        feed = again.change_feed()
        try:
            assert feed.wait(1.0) == ANYTHING
            again.claim(machine(2, "srv1"))
            assert feed.wait(2.0) == Changes(frozenset({machine(2, None).public_key}))
        finally:
            feed.close()


def test_a_flood_of_notifications_is_read_as_anything_not_kept_key_by_key(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gatekeeper.server.pg_registry import PostgresChangeFeed, PostgresRegistry

    monkeypatch.setattr(PostgresChangeFeed, "MAX_KEYS", 3)
    with PostgresRegistry(pg_url, shown=pg_url) as reg:
        feed = reg.change_feed()
        try:
            assert feed.wait(1.0) == ANYTHING
            with psycopg.connect(pg_url, autocommit=True) as db, db.transaction():
                for n in range(50):  # any writer of the database can notify
                    db.execute("SELECT pg_notify('gatekeeper_machines', %s)", (f"k{n}",))
            assert feed.wait(2.0) == ANYTHING
            reg.claim(machine(1, "srv1"))
            while (changes := feed.wait(2.0)) == ANYTHING:
                pass  # what the bounded wait left for later
            assert changes == Changes(frozenset({machine(1, None).public_key}))
        finally:
            feed.close()
