"""Machines cannot reach each other through the server, and `gatekeeper machines` shows and
removes them: real agents in namespaces, the real server, nftables in the server namespace."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest
from fleetlab import gk

from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab
from gatekeeper.server.audit import read_audit

pytestmark = pytest.mark.netns


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def in_agent(machine: Machine, argv: list[str]) -> None:
    """Run inside the agent's own mount and network namespaces (its private wireguard run dir)."""
    assert machine.proc is not None
    subprocess.run(
        ["nsenter", "-t", str(machine.proc.pid), "-m", "-n", *argv],
        check=True,
        capture_output=True,
        timeout=10,
    )


def route_to(machine: Machine, status: dict[str, str], other: str) -> None:
    """What a hostile machine's root can do: send the other's address into the link."""
    server = status["server_address"]
    in_agent(
        machine,
        [
            "wg", "set", "siderolink", "peer", status["server_public_key"],
            "allowed-ips", f"{server}/128,{other}/128",
        ],
    )  # fmt: skip
    in_agent(machine, ["ip", "-6", "route", "replace", f"{other}/128", "dev", "siderolink"])


def test_machine_cannot_reach_another_even_with_a_route(sl: SideroLinkLab) -> None:
    sl.start_server()
    # Forwarding on: without the isolation table the server would route between machines.
    sl.server_ns.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    a, b = sl.add_machine(), sl.add_machine()
    sa, sb = sl.wait_connected(a), sl.wait_connected(b)
    addr_a, addr_b = sa["node_address"].split("/")[0], sb["node_address"].split("/")[0]
    # Both machines collude: each routes the other's address into its link.
    route_to(a, sa, addr_b)
    route_to(b, sb, addr_a)
    assert sl.ping(a, sa["server_address"])
    assert not sl.ping(a, addr_b, count=2, wait=1)
    ruleset = sl.server_ns.run(["nft", "list", "table", "inet", "gatekeeper-server"])
    (dropped,) = re.findall(
        r"counter packets (\d+) .* drop comment \"no machine-to-machine", ruleset
    )
    assert int(dropped) > 0
    # Control: with the table gone, the same packets do get through. So the table is the wall.
    sl.server_ns.run(["nft", "delete", "table", "inet", "gatekeeper-server"])
    assert sl.ping(a, addr_b, count=3, wait=1)


def test_machines_lists_live_data_and_remove_drops_the_peer(
    sl: SideroLinkLab, registry_args: list[str]
) -> None:
    sl.start_server(*registry_args)
    m = sl.add_machine()
    status = sl.wait_connected(m)
    rows = json.loads(gk(sl, "machines", "--json", registry=registry_args).stdout)
    (row,) = rows
    assert row["uuid"] == m.node_uuid
    assert row["address"] == status["node_address"].split("/")[0]
    assert row["connected"] is True and row["last_handshake"]
    assert row["endpoint"] == f"[{m.underlay}]:51821"
    assert row["tunnel"] is False and row["version"] == "v1.9.0"  # the Talos API level sent
    table = gk(sl, "machines", registry=registry_args).stdout
    assert "LAST HANDSHAKE" in table and m.node_uuid in table and "yes" in table

    assert status["public_key"] in sl.server_peers()
    gk(sl, "machines", "remove", m.node_uuid, registry=registry_args)
    assert status["public_key"] not in sl.server_peers()
    assert json.loads(gk(sl, "machines", "--json", registry=registry_args).stdout) == []
    (line,) = [
        a for a in read_audit(sl.state_dir / "audit.jsonl") if a["action"] == "machine.remove"
    ]
    assert line["node_uuid"] == m.node_uuid and "uid" in str(line["who"])
    missing = gk(sl, "machines", "remove", m.node_uuid, check=False, registry=registry_args)
    assert missing.returncode == 1 and "no machine" in missing.stderr

    # With the server stopped, the records are still listed; live columns are unknown.
    sl.stop_agent(m)
    sl.start_agent(m)
    sl.wait_connected(m)
    sl.stop_server()
    (row,) = json.loads(gk(sl, "machines", "--json", registry=registry_args).stdout)
    assert row["uuid"] == m.node_uuid and row["connected"] is None
    assert "no server running" in gk(sl, "machines", registry=registry_args).stdout
