"""Two real `gatekeeper server` instances on one real PostgreSQL, each device holding exactly the
machines its instance owns (docs/registry.md, "Owners and failover"): a removal from anywhere
reaches the owner's device, a machine that provisions through the other instance moves there,
an instance killed with kill -9 is taken over and its machines come back on the survivor with
the same address and without provisioning again, and one --instance name cannot run twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fleetlab import provisions
from pgcluster import PgCluster
from test_fleet_postgres import TwoServers, outcome, request, two_servers, wg_peers

from gatekeeper.lab.netns import Namespace
from gatekeeper.lab.siderolink_lab import gatekeeper_argv
from gatekeeper.server.instances import HEARTBEAT_EVERY
from gatekeeper.server.registry import INSTANCE_STALE_AFTER

pytestmark = pytest.mark.netns


@pytest.fixture
def fleet(pg_cluster: PgCluster) -> Iterator[TwoServers]:
    with two_servers(pg_cluster) as servers:
        yield servers


def listed(fleet: TwoServers) -> list[dict[str, object]]:
    done = fleet.gk("machines", "--json", via=fleet.b)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def within(seconds: float, check: Callable[[], bool]) -> float | None:
    """Seconds until `check()` held, None if it never did."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def fleet_instances(fleet: TwoServers) -> list[dict[str, Any]]:
    done = fleet.gk("instances", "--json", via=fleet.b)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)["instances"]
    return rows


def instances(fleet: TwoServers) -> list[str]:
    with psycopg.connect(fleet.url, password=fleet.password_file.read_text().strip()) as db:
        return [r[0] for r in db.execute("SELECT name FROM instances ORDER BY name")]


def version_over_overlay(ns: Namespace, address: str) -> bool:
    done = subprocess.run(
        ns.exec_argv([*gatekeeper_argv("maint"), "version", "-n", address, "--timeout", "2"]),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return done.returncode == 0 and "Tag:" in done.stdout


def test_a_machine_lives_on_its_owners_device_and_moves_with_its_provision(
    fleet: TwoServers,
) -> None:
    m = fleet.sl.add_machine(start=False)
    req = request(fleet.sl.join_token)
    key = str(req["node_public_key"])
    assert [outcome(r) for r in provisions(m, fleet.a.target, [req])] == ["OK"]
    assert key in wg_peers(fleet.a.interface) and key not in wg_peers(fleet.b.interface)
    (row,) = listed(fleet)
    assert row["instance"] == "srv1"
    # The same machine provisions through the other instance: its peer moves there (B puts it
    # on its device; A's reconciler takes it off, woken by the store's notification).
    assert [outcome(r) for r in provisions(m, fleet.b.target, [req])] == ["OK"]
    assert key in wg_peers(fleet.b.interface)
    took = within(2.0, lambda: key not in wg_peers(fleet.a.interface))
    assert took is not None, "the machine's peer stayed on the instance that lost it"
    print(f"peer left the former owner's device {took:.2f} s after the Provision")
    (row,) = listed(fleet)
    assert row["instance"] == "srv2"
    # A removal through the registry alone (no admin socket of the owner is reached: the CLI
    # runs with A's state directory) still takes the peer off the owner's device.
    removed = fleet.gk("machines", "remove", str(req["node_uuid"]), via=fleet.a)
    assert removed.returncode == 0, removed.stderr
    took = within(2.0, lambda: key not in wg_peers(fleet.b.interface))
    assert took is not None, "a removal through the registry did not reach the owner's device"
    print(f"removal reached the owner's device in {took:.2f} s")


def test_an_instance_killed_is_taken_over_and_its_machine_is_back_with_its_address(
    fleet: TwoServers,
) -> None:
    # A fleet that has run for a while: each instance has read the other's heartbeat, so
    # A's replies list B's endpoint after its own.
    assert within(10.0, lambda: instances(fleet) == ["srv1", "srv2"]) is not None
    time.sleep(HEARTBEAT_EVERY + 0.5)
    agent = fleet.sl.add_machine()  # joins through A (the lab's API URL)
    status = fleet.sl.wait_connected(agent)
    address = status["node_address"].split("/")[0]
    assert version_over_overlay(fleet.a.ns, address)
    # ... and A has recorded where the machine is (its endpoint sync, every 5 s while
    # machines join), which is where a survivor dials it.
    assert within(10.0, lambda: bool(listed(fleet)[0]["endpoint"])) is not None
    (row,) = listed(fleet)
    assert row["instance"] == "srv1" and row["provisions"] == 1
    before = fleet_instances(fleet)
    assert [(i["name"], i["live"], i["machines"]) for i in before] == [
        ("srv1", True, 1),
        ("srv2", True, 0),
    ]
    assert before[0]["endpoints"] == [f"[{fleet.a.underlay}]:51821"]
    # kill -9 of the whole instance: the server and its wireguard-go (its process group).
    os.killpg(fleet.a.proc.pid, signal.SIGKILL)
    fleet.a.proc.wait(timeout=10)
    killed = time.monotonic()
    took = within(60.0, lambda: version_over_overlay(fleet.b.ns, address))
    assert took is not None, (
        f"the machine is not back on the survivor 60 s after the kill\n"
        f"{fleet.sl.tail(agent.log)}\n{fleet.sl.tail(fleet.sl.workdir / 'server2.log')}"
    )
    print(f"maintenance API answering from the survivor {took:.1f} s after kill -9")
    again = agent.status()
    assert again is not None and again["node_address"] == status["node_address"]
    (row,) = listed(fleet)
    assert row["instance"] == "srv2"
    # Back without a new Provision: the survivor took the machine over and dialled it.
    assert row["provisions"] == 1, row
    # What an operator sees: the dead instance stale (its heartbeat older than 15 s), the
    # survivor holding the machine.
    after = fleet_instances(fleet)
    assert [(i["name"], i["live"], i["machines"]) for i in after] == [
        ("srv1", False, 0),
        ("srv2", True, 1),
    ]
    assert after[0]["heartbeat_age_s"] > INSTANCE_STALE_AFTER
    assert time.monotonic() - killed < 90


def test_a_second_process_under_one_instance_name_is_refused(fleet: TwoServers) -> None:
    # B's name, another interface and port, on A's namespace: the store refuses the name
    # while B's heartbeat is fresh (after waiting as long as a dead predecessor's would take).
    state = fleet.sl.workdir / "state-dup"
    argv = gatekeeper_argv(
        "server",
        "--state-dir", str(state),
        "--registry", fleet.url,
        "--registry-password-file", str(fleet.password_file),
        "--listen", f"[{fleet.a.underlay}]:50999",
        "--wireguard-interface", f"gk{fleet.sl.lab.lab_id}dup",
        "--wireguard-port", "51899",
        "--endpoint", f"[{fleet.a.underlay}]:51899",
        "--instance", "srv2",
    )  # fmt: skip
    done = subprocess.run(
        fleet.a.ns.exec_argv(argv), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gatekeeper server: another server runs as instance 'srv2'"), last
    assert "--instance" in last
    # The live one is untouched.
    assert fleet.b.proc.poll() is None
    assert outcome(provisions(fleet.sl.add_machine(start=False), fleet.b.target, [
        request(fleet.sl.join_token)
    ])[0]) == "OK"  # fmt: skip
