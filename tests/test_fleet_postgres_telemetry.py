"""Two real servers on one real PostgreSQL registry, a real agent joined through each: the
events and kernel logs each server received are read back through the registry with
`gatekeeper events --registry` / `gatekeeper logs UUID --registry`, whichever --state-dir; a
PostgreSQL that stops for a while costs neither the server nor the link, nor the lines sent."""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
from pgcluster import PgCluster, started_cluster, unavailable
from test_fleet_postgres import SERVER_OVERLAY, Instance, TwoServers, two_servers

from gatekeeper.lab.siderolink_lab import API_PORT

pytestmark = pytest.mark.netns


def eventually(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def joined_through(fleet: TwoServers, server: Instance) -> Any:
    """A real agent provisioning through `server`, sending events and kernel logs to ::1."""
    api = f"grpc://[{server.underlay}]:{API_PORT}?jointoken={fleet.sl.join_token}"
    m = fleet.sl.add_machine(start=False, api_url=api)
    m.cmdline.write_text(
        m.cmdline.read_text().strip() + f" talos.events.sink=[{SERVER_OVERLAY}]:8090"
        f" talos.logging.kernel=tcp://[{SERVER_OVERLAY}]:8092\n"
    )
    fleet.sl.start_agent(m)
    fleet.sl.wait_connected(m)
    return m


def test_events_and_logs_sent_to_either_server_are_read_through_the_registry(
    pg_cluster: PgCluster,
) -> None:
    with two_servers(pg_cluster) as fleet:
        machines = [joined_through(fleet, s) for s in (fleet.a, fleet.b)]

        def connected_events(uuid: str, via: Instance) -> list[dict[str, Any]]:
            out = fleet.gk("events", "--json", "--machine", uuid, via=via).stdout
            found = [json.loads(x) for x in out.splitlines()]
            return [e for e in found if e.get("data", {}).get("connected")]

        for m in machines:
            # Read with the OTHER server's --state-dir: only the registry can have it.
            for via in (fleet.a, fleet.b):
                (first, *_) = eventually(
                    f"{m.node_uuid}'s connected event",
                    functools.partial(connected_events, m.node_uuid, via),
                )
                assert first["machine"] == m.node_uuid

        marker = f"gatekeeper-pg-telemetry-{secrets.token_hex(4)}"
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"<4>{marker}\n")
        for m in machines:

            def logged(uuid: str = m.node_uuid) -> list[str]:
                out = fleet.gk("logs", uuid, via=fleet.b).stdout
                return [x for x in out.splitlines() if marker in x]

            (line,) = eventually(f"the kernel line in {m.node_uuid}'s logs", logged)
            assert line.endswith(marker)
        for n in (1, 2):
            log = (fleet.sl.workdir / f"server{n}.log").read_text()
            assert "Traceback" not in log and "telemetry store" not in log


def test_postgresql_stopped_the_server_holds_its_logs_and_writes_them_when_back() -> None:
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    cluster = started_cluster()
    try:
        with two_servers(cluster) as fleet:
            m = joined_through(fleet, fleet.a)

            def logged(marker: str) -> bool:
                return marker in fleet.gk("logs", m.node_uuid).stdout

            before = f"gatekeeper-pg-before-{secrets.token_hex(4)}"
            with open("/dev/kmsg", "w") as kmsg:
                kmsg.write(f"<4>{before}\n")
            try:
                eventually("the line sent before the outage", lambda: logged(before))
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{fleet.explain(m)}") from None

            cluster.stop()
            during = f"gatekeeper-pg-during-{secrets.token_hex(4)}"
            with open("/dev/kmsg", "w") as kmsg:
                kmsg.write(f"<4>{during}\n")
            server_log = fleet.sl.workdir / "server1.log"
            eventually(
                "one line saying the store is away",
                lambda: "telemetry store unavailable" in server_log.read_text(),
            )
            # The link and the server do not need the store.
            assert fleet.sl.ping(m, SERVER_OVERLAY, count=3)
            assert fleet.a.proc.poll() is None

            cluster.start()
            eventually("the line held through the outage", lambda: logged(during))
            text = server_log.read_text()
            assert text.count("telemetry store unavailable") == 1, text[-3000:]
            assert "telemetry store back: 0 events and log lines were dropped" in text
            assert "Traceback" not in text
    finally:
        cluster.close()
