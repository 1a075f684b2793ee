"""The PostgreSQL registry against a real PostgreSQL 15: what the store decides when several
servers share it, the schema's versions, and every bad URL, password or outage in one line."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgcluster import PgCluster

from gatekeeper.server.pg_registry import PostgresRegistry
from gatekeeper.server.pg_schema import SCHEMA_VERSION
from gatekeeper.server.registry import (
    AddressTaken,
    MachineRecord,
    RegistrationLimit,
    RegistryError,
    RegistryUnavailable,
    ServerIdentity,
    TokenRefused,
    machine_key,
)
from gatekeeper.server.registry_url import open_registry, parse_registry_url
from gatekeeper.server.tokens import new_token
from gatekeeper.wireguard.keys import PrivateKey


def machine(n: int, address: int | None = None) -> MachineRecord:
    uuid = f"00000000-0000-0000-0000-{n:012d}"
    return MachineRecord(
        machine_key=machine_key(uuid, None),
        node_uuid=uuid,
        address=ipaddress.IPv6Address(f"fdae:41e4:649b:9303::{address or n:x}"),
        public_key=PrivateKey.generate().public_key().base64(),
    )


def at_once(count: int, work: Callable[[int], Any]) -> list[Any]:
    """`work(i)` for every i in as many threads, released together; results or exceptions."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_two_servers_racing_for_a_token_use_and_an_address(pg_url: str) -> None:
    # Two registries are two connections, as two servers have.
    regs = [PostgresRegistry(pg_url, shown=pg_url) for _ in range(2)]
    try:
        _, token = new_token(name="five", now=time.time(), max_uses=5)
        regs[0].add_token(token)
        outcomes = at_once(
            10, lambda i: regs[i % 2].claim(machine(100 + i), token_id=token.token_id)
        )
        refused = [o for o in outcomes if isinstance(o, TokenRefused)]
        assert outcomes.count(None) == 5 and len(refused) == 5, outcomes
        assert all(str(o) == "join token used up" for o in refused)
        assert regs[1].token(token.token_id).uses == 5  # type: ignore[union-attr]
        # Ten machines drawing the same address through two servers: the store lets one in.
        outcomes = at_once(10, lambda i: regs[i % 2].claim(machine(200 + i, address=0x77)))
        assert outcomes.count(None) == 1, outcomes
        assert all(isinstance(o, AddressTaken) for o in outcomes if o is not None)
        assert len(regs[0].machines()) == 6
    finally:
        for reg in regs:
            reg.close()


def test_the_registration_limit_holds_across_servers(pg_url: str) -> None:
    regs = [PostgresRegistry(pg_url, shown=pg_url) for _ in range(2)]
    try:
        outcomes = at_once(12, lambda i: regs[i % 2].claim(machine(300 + i), max_machines=4))
        assert outcomes.count(None) == 4, outcomes
        assert all(isinstance(o, RegistrationLimit) for o in outcomes if o is not None)
        # The order is the store's (the order of commits), whatever the servers' clocks say.
        listed = regs[1].machines()
        assert len(listed) == 4 and len({m.address for m in listed}) == 4
    finally:
        for reg in regs:
            reg.close()


def test_servers_starting_at_once_migrate_once(pg_url: str) -> None:
    outcomes = at_once(6, lambda i: PostgresRegistry(pg_url, shown=pg_url))
    assert all(isinstance(o, PostgresRegistry) for o in outcomes), outcomes
    with outcomes[0]._connection().cursor() as cur:
        cur.execute("SELECT version FROM gatekeeper_schema")
        assert cur.fetchall() == [(SCHEMA_VERSION,)]
    for reg in outcomes:
        reg.close()


def test_a_schema_from_a_newer_version_is_refused_in_one_line(
    pg_url: str, pg_cluster: PgCluster
) -> None:
    PostgresRegistry(pg_url, shown=pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE gatekeeper_schema SET version = 99")
    for readonly in (False, True):
        with pytest.raises(RegistryError) as info:
            PostgresRegistry(pg_url, shown=pg_url, readonly=readonly)
        assert str(info.value) == (
            f"the registry {pg_url} has schema version 99, newer than this gatekeeper's "
            f"({SCHEMA_VERSION}): upgrade gatekeeper on this host"
        )


def test_bad_urls_and_passwords_are_one_line_without_the_password(
    pg_url: str, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    cases = {
        "mysql://root:hunter2@db/gk": "unknown kind of registry 'mysql': use sqlite:///PATH or",
        "postgresql://gatekeeper:hunter2@/gk?port=x": "no password in the URL (ps shows it)",
        "sqlite://relative/file": "a SQLite registry is sqlite:///ABSOLUTE/FILE",
        "postgresql://gatekeeper:hunter2@/gk": "no password in the URL (ps shows it)",
        "postgresql://gatekeeper@/gk?nosuchparameter=1": "not a valid PostgreSQL URL",
    }
    for url, expected in cases.items():
        with pytest.raises(RegistryError) as info:
            open_registry(url, state)
        assert expected in str(info.value) and "\n" not in str(info.value)
        assert "hunter2" not in str(info.value)
    gone = f"postgresql://gatekeeper@/gk?host={tmp_path / 'nowhere'}"
    with pytest.raises(RegistryUnavailable) as unreachable:
        open_registry(gone, state)
    assert str(unreachable.value).startswith(f"the registry {gone} is unreachable: ")
    missing = pg_cluster.url("no_such_db")
    with pytest.raises(RegistryError, match='database "no_such_db" does not exist') as info:
        open_registry(missing, state)
    assert "\n" not in str(info.value)
    # The password: wrong in PGPASSWORD, then right in a file, which wins.
    monkeypatch.setenv("PGPASSWORD", "wrong-password")
    with pytest.raises(
        RegistryError, match=r"refused the login: .*password authentication"
    ) as info:
        open_registry(pg_url, state)
    assert "wrong-password" not in str(info.value) and "\n" not in str(info.value)
    # Not a passing outage (Provision would say UNAVAILABLE): the configuration is wrong.
    assert not isinstance(info.value, RegistryUnavailable)
    with open_registry(pg_url, state, password_file=pg_cluster.password_file) as reg:
        assert reg.machines() == []
    monkeypatch.delenv("PGPASSWORD")
    with open_registry(pg_url, state, password_file=pg_cluster.password_file) as reg:
        assert reg.machines() == []
    with pytest.raises(RegistryError, match="cannot read --registry-password-file"):
        open_registry(pg_url, state, password_file=tmp_path / "none")
    assert parse_registry_url(None, state).where == str(state / "registry.sqlite3")


def test_a_dropped_connection_is_retried_on_a_fresh_one(pg_url: str, pg_cluster: PgCluster) -> None:
    with PostgresRegistry(pg_url, shown=pg_url) as reg:
        reg.claim(machine(1))
        with pg_cluster.admin() as db:
            db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'gatekeeper'"
            )
        # The first call after a PostgreSQL restart (or a failover) just works.
        reg.claim(machine(2))
        assert [m.node_uuid[-1] for m in reg.machines()] == ["1", "2"]


def gk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatekeeper", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_fleet_commands_take_the_registry_url(pg_url: str, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    created = gk("token", "create", "--name", "pg", "--registry", pg_url, "--state-dir", state)
    assert created.returncode == 0, created.stderr
    token_id = created.stdout.strip().split(".")[0]
    listed = gk("token", "list", "--json", "--registry", pg_url)
    assert listed.returncode == 0 and token_id in listed.stdout
    revoked = gk("token", "revoke", token_id, "--registry", pg_url, "--state-dir", state)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    with PostgresRegistry(pg_url, shown=pg_url) as reg:
        reg.claim(machine(7))
    machines = gk("machines", "--registry", pg_url, "--state-dir", state)
    assert machines.returncode == 0 and "00000000-0000-0000-0000-000000000007" in machines.stdout
    removed = gk(
        "machines", "--state-dir", state, "remove", "00000000-0000-0000-0000-000000000007",
        "--registry", pg_url,
    )  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    gone = f"postgresql://gatekeeper@/gk?host={tmp_path / 'nowhere'}"
    down = gk("machines", "--registry", gone)
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.count("\n") == 1
    assert down.stderr.startswith(f"gatekeeper machines: the registry {gone} is unreachable: ")


def test_a_store_that_stops_answering_is_unavailable_in_time(pg_url: str) -> None:
    with PostgresRegistry(pg_url, shown=pg_url, answer_within=1.0) as reg:
        reg.claim(machine(1))
        # Our cluster's backend serving this connection, frozen: it answers nothing, and
        # enforces no statement_timeout either (as a stopped VM or a lost network).
        backend = reg._connection().info.backend_pid
        os.kill(backend, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable) as info:
                reg.machines()
            took = time.monotonic() - started
        finally:
            os.kill(backend, signal.SIGCONT)
        assert str(info.value) == f"the registry {pg_url} did not answer within 1 s"
        assert 0.9 < took < 2.5, took
        # The next call runs on a fresh connection.
        assert len(reg.machines()) == 1


def test_a_server_on_a_bad_registry_refuses_to_start_in_one_line(
    pg_url: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    PostgresRegistry(pg_url, shown=pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE gatekeeper_schema SET version = 99")
    gone = f"postgresql://gatekeeper@/gk?host={tmp_path / 'nowhere'}"
    expected = {
        "mysql://root@db/gk": "gatekeeper server: --registry: unknown kind of registry 'mysql'",
        "postgresql://gatekeeper:hunter2@/gk": "gatekeeper server: --registry: no password in",
        gone: f"gatekeeper server: the registry {gone} is unreachable: ",
        pg_url: f"gatekeeper server: the registry {pg_url} has schema version 99, newer",
    }
    other = pg_cluster.create_database()
    try:
        with PostgresRegistry(other, shown=other) as reg:
            reg.identity(lambda: ServerIdentity(PrivateKey.generate(), "fleet-a"))
        expected[other] = (
            f"gatekeeper server: the registry {other} belongs to installation id 'fleet-a', "
            "not '': every machine's address depends on it"
        )
        check_server_refusals(expected, tmp_path)
    finally:
        pg_cluster.drop_database(other)


def check_server_refusals(expected: dict[str, str], tmp_path: Path) -> None:
    for url, start in expected.items():
        done = gk(
            "server", "--state-dir", str(tmp_path / "state"), "--registry", url,
            "--endpoint", "[fd00:6b:1::1]:51820", "--wireguard-interface", "gkbadreg",
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(start), done.stderr
        assert done.stderr.count("\n") == 1 and "hunter2" not in done.stderr
