"""Shared fixtures: a network-namespace lab and a PostgreSQL, always torn down."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pgcluster
import pytest
from pgcluster import PgCluster

from gatekeeper.lab.netns import Lab
from gatekeeper.server.pg_registry import PostgresRegistry
from gatekeeper.server.sqlite_registry import SqliteRegistry


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A Lab (namespaces, veths, processes) closed after the test, pass or fail."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces require CAP_NET_ADMIN and CAP_SYS_ADMIN")
    if shutil.which("ip") is None:
        pytest.skip("ip not found: install the Debian package iproute2")
    if shutil.which("wireguard-go") is None:
        pytest.skip("wireguard-go not found: install the Debian package wireguard-go")
    with Lab() as built:
        yield built


def _cluster() -> Iterator[PgCluster]:
    why = pgcluster.unavailable()
    if why is not None:
        pytest.skip(why)
    cluster = pgcluster.started_cluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One real PostgreSQL for the session (stopped and removed at the end, pass or fail)."""
    yield from _cluster()


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL of this test's own, to stop and start without disturbing the others."""
    yield from _cluster()


@pytest.fixture
def pg_url(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL; PGPASSWORD set for this test."""
    monkeypatch.setenv("PGPASSWORD", pg_cluster.password)
    url = pg_cluster.create_database()
    try:
        yield url
    finally:
        pg_cluster.drop_database(url)


Opener = Callable[[], Any]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the registry under test (again and again: a reopen is a server restart)."""
    opened: list[Any] = []
    if request.param == "sqlite":

        def opener() -> Any:
            opened.append(SqliteRegistry(tmp_path))
            return opened[-1]
    else:
        url = request.getfixturevalue("pg_url")

        def opener() -> Any:
            opened.append(PostgresRegistry(url, shown=url))
            return opened[-1]

    yield opener
    for reg in opened:
        reg.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_args(request: pytest.FixtureRequest) -> list[str]:
    """Options for `gatekeeper server` and the fleet commands: the default SQLite registry,
    then a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return []
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    url: str = request.getfixturevalue("pg_url")
    return ["--registry", url, "--registry-password-file", str(cluster.password_file)]
