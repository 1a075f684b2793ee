"""The agent under attack and faults, with real parts: namespaces, wireguard-go, nftables, gRPC.

Each test is one finding of an attacker or a careless operator: an underlay neighbour with a
route to the overlay address, an empty kernel argument, wireguard-go killed, the agent killed,
a second agent on the same interface name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.firewall.ruleset import TAG_OVERLAY_GUARD
from gatekeeper.lab.netns import Namespace
from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab

pytestmark = pytest.mark.netns

MAINT = [sys.executable, "-m", "gatekeeper", "maint"]


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def maint_version(ns: Namespace, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns.exec_argv([*MAINT, "version", "-n", address, "--timeout", "3"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def node_ip(status: dict[str, Any]) -> str:
    return str(status["node_address"]).split("/")[0]


def children(pid: int, name: str) -> list[int]:
    """PIDs of `pid`'s children whose command is `name`."""
    kids: list[str] = []
    # Per thread: the agent starts wireguard-go from a worker thread.
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            continue
    out = []
    for kid in kids:
        try:
            if Path(f"/proc/{kid}/comm").read_text().strip() == name:
                out.append(int(kid))
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wireguard_go_of(machine: Machine) -> int:
    assert machine.proc is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = children(machine.proc.pid, "wireguard-go")
        if pids:
            assert len(pids) == 1, pids
            return pids[0]
        time.sleep(0.05)
    raise AssertionError("the agent runs no wireguard-go")


def guard_packets(ns: Namespace) -> int | None:
    """Packets the overlay guard dropped so far; None while the rule is not in the table."""
    out = ns.run(["nft", "-j", "list", "table", "inet", "gatekeeper"], check=False)
    if not out:
        return None
    total = None
    for obj in json.loads(out)["nftables"]:
        rule = obj.get("rule")
        if rule and rule.get("comment") == TAG_OVERLAY_GUARD:
            for stmt in rule["expr"]:
                if "counter" in stmt:
                    total = (total or 0) + int(stmt["counter"]["packets"])
    return total


@pytest.mark.parametrize("firewall", ["documents", "--no-firewall"])
def test_an_underlay_neighbour_with_a_route_cannot_reach_the_maintenance_api(
    sl: SideroLinkLab, firewall: str
) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    sl.start_agent(machine, *([firewall] if firewall.startswith("--") else []))
    address = node_ip(sl.wait_connected(machine))
    outsider = sl.add_machine(start=False)
    # Linux accepts packets for a local address on any interface: route the overlay /128 via
    # the machine's underlay address, as a hostile neighbour on the same segment can.
    outsider.ns.run(["ip", "-6", "route", "add", f"{address}/128", "via", machine.underlay])
    assert sl.ping(outsider, machine.underlay), "the underlay itself must work (control)"
    deadline = time.monotonic() + 10
    while guard_packets(machine.ns) is None or maint_version(sl.server_ns, address).returncode:
        assert time.monotonic() < deadline, "overlay guard not in force"
        time.sleep(0.2)
    assert sl.wait_status(machine, lambda s: s.get("firewall_overlay_guard"), 15, "guarded")
    before = guard_packets(machine.ns) or 0
    refused = maint_version(outsider.ns, address)
    assert refused.returncode != 0
    assert not sl.ping(outsider, address)
    # Dropped by the guard (not by routing): its counter moved.
    assert (guard_packets(machine.ns) or 0) > before
    # The admin over the overlay is served as before.
    assert maint_version(sl.server_ns, address).returncode == 0
    explain = subprocess.run(
        machine.ns.exec_argv(
            [
                sys.executable,
                "-m",
                "gatekeeper",
                "firewall",
                "explain",
                "--run-dir",
                str(machine.run_dir),
                "--iif",
                "eth0",
                "--src",
                outsider.underlay,
                "--dst",
                address,
                "--proto",
                "tcp",
                "--dport",
                "50000",
            ]
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "verdict: DROP" in explain.stdout and TAG_OVERLAY_GUARD in explain.stdout, (
        explain.stdout + explain.stderr
    )


def test_an_empty_kernel_argument_keeps_the_link_and_says_why(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    status = sl.wait_connected(machine)
    address, provisions = node_ip(status), status["provisions"]
    good = machine.cmdline.read_text()
    machine.cmdline.write_text("console=ttyS0 siderolink.api= quiet\n")
    status = sl.wait_status(
        machine, lambda s: "present but empty" in (s.get("config_error") or ""), 10, "rejected"
    )
    assert status["connected"] and node_ip(status) == address
    assert status["provisions"] == provisions
    assert maint_version(sl.server_ns, address).returncode == 0
    # The listener did not move to every address: the underlay port stays closed.
    assert maint_version(machine.ns, machine.underlay).returncode != 0
    machine.cmdline.write_text(good)
    status = sl.wait_status(machine, lambda s: not s.get("config_error"), 10, "accepted")
    assert status["connected"] and status["provisions"] == provisions
    log = machine.log.read_text()
    assert "SideroLink is not configured" not in log
    assert sl.join_token not in log


def test_documents_never_read_fail_closed_and_valid_ones_take_over(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    rules = machine.run_dir / "rules.yaml"
    rules.write_text("apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: [broken\n")
    sl.start_agent(machine, "--firewall-config", str(rules))
    # Still joins: the overlay and the WireGuard port are admitted in block mode.
    status = sl.wait_connected(machine, timeout=30)
    assert "failing closed" in (status.get("firewall_error") or "")
    table = machine.ns.run(["nft", "list", "chain", "inet", "gatekeeper", "ingress"])
    assert "policy drop" in table
    rules.write_text("apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: accept\n")
    sl.wait_status(machine, lambda s: not s.get("firewall_error"), 10, "firewall ok")
    deadline = time.monotonic() + 10
    while "policy accept" not in machine.ns.run(
        ["nft", "list", "chain", "inet", "gatekeeper", "ingress"]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_killed_wireguard_go_is_restarted_with_the_same_key_and_address(
    sl: SideroLinkLab,
) -> None:
    sl.start_server()
    machine = sl.add_machine()
    status = sl.wait_connected(machine)
    address, provisions, key = node_ip(status), status["provisions"], status["public_key"]
    old = wireguard_go_of(machine)
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    down = sl.wait_status(machine, lambda s: not s.get("connected"), 3, "down")
    noticed = time.monotonic() - killed
    assert "wireguard-go" in (down.get("last_error") or "")
    up = sl.wait_connected(machine, timeout=10)
    back = time.monotonic() - killed
    assert node_ip(up) == address and up["public_key"] == key
    assert up["provisions"] == provisions, "restoring the device needs no Provision"
    assert wireguard_go_of(machine) != old
    assert sl.ping(machine, up["server_address"])
    print(f"wireguard-go kill -9: noticed after {noticed:.2f} s, link back after {back:.2f} s")
    assert noticed < 3 and back < 5


def test_a_killed_agent_leaves_an_orphan_that_the_next_start_cleans_up(
    sl: SideroLinkLab, tmp_path: Path
) -> None:
    # One /run/wireguard for both runs, as on a real host (not a fresh tmpfs per start).
    run_dir = tmp_path / "wireguard-run"
    run_dir.mkdir()
    sl.start_server()
    machine = sl.add_machine(start=False)
    sl.start_agent(machine, wireguard_run=run_dir)
    sl.wait_connected(machine)
    orphan = wireguard_go_of(machine)
    assert machine.proc is not None
    os.kill(machine.proc.pid, signal.SIGKILL)
    machine.proc.wait(10)
    sl.lab.processes.remove(machine.proc)
    machine.proc = None
    time.sleep(0.5)
    assert alive(orphan), "wireguard-go outlives a kill -9 of its agent"
    (machine.run_dir / "status.json").unlink()
    sl.start_agent(machine, wireguard_run=run_dir)
    status = sl.wait_connected(machine, timeout=30)
    assert not alive(orphan)
    assert machine.proc is not None
    assert len(children(machine.proc.pid, "wireguard-go")) == 1
    assert sl.ping(machine, status["server_address"])
    assert "left by an earlier run" in machine.log.read_text()
    if alive(orphan):  # never leave it behind, even if an assertion above failed
        os.kill(orphan, signal.SIGKILL)


def test_a_second_agent_on_the_same_interface_name_is_refused_and_the_first_unharmed(
    sl: SideroLinkLab, tmp_path: Path
) -> None:
    shared = tmp_path / "wireguard-run"
    shared.mkdir()
    sl.start_server()
    first = sl.add_machine(start=False)
    sl.start_agent(first, wireguard_run=shared)
    status = sl.wait_connected(first)
    first_wg = wireguard_go_of(first)
    second = sl.add_machine(start=False)
    sl.start_agent(second, wireguard_run=shared)
    refused = sl.wait_status(
        second,
        lambda s: "is served by" in (s.get("last_error") or ""),
        20,
        "refused",
    )
    message = refused["last_error"]
    assert "started by Gatekeeper pid" in message and "still running" in message
    assert "another network namespace" in message
    time.sleep(2)
    assert alive(first_wg) and wireguard_go_of(first) == first_wg
    assert first.status()["connected"]
    assert sl.ping(first, status["server_address"])


def test_a_table_deleted_behind_the_agents_back_is_restored(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    address = node_ip(sl.wait_connected(machine))
    deadline = time.monotonic() + 10
    while guard_packets(machine.ns) is None:
        assert time.monotonic() < deadline, "overlay guard not in force"
        time.sleep(0.2)
    machine.ns.run(["nft", "delete", "table", "inet", "gatekeeper"])
    deleted = time.monotonic()
    while guard_packets(machine.ns) is None:
        # The periodic check reads the kernel back every 10 s.
        assert time.monotonic() - deleted < 25, "the table was not restored"
        time.sleep(0.5)
    assert maint_version(sl.server_ns, address).returncode == 0


def test_a_second_agent_in_the_same_namespace_is_refused_and_the_first_unharmed(
    sl: SideroLinkLab,
) -> None:
    # Each has its own /run/wireguard (no shared socket to see), but the link name, the
    # firewall table and the maintenance port are the namespace's: one agent per namespace.
    sl.start_server()
    first = sl.add_machine()
    status = sl.wait_connected(first)
    first_wg = wireguard_go_of(first)
    run_dir = first.run_dir.parent / "m1-second"
    run_dir.mkdir()
    second = Machine(
        name="m1-second",
        ns=first.ns,
        underlay=first.underlay,
        node_uuid=str(uuid.uuid4()),
        run_dir=run_dir,
        cmdline=first.cmdline,
        log=run_dir / "agent.log",
    )
    sl.start_agent(second, "--listen-port", "51822")
    assert second.proc is not None
    assert second.proc.wait(30) == 1
    lines = second.log.read_text().strip().splitlines()
    assert lines[-1].startswith("gatekeeper agent: another gatekeeper agent (pid ")
    assert "runs in this network namespace" in lines[-1]
    assert not (run_dir / "status.json").exists()
    time.sleep(1)
    assert alive(first_wg) and wireguard_go_of(first) == first_wg
    assert first.status()["connected"]
    assert sl.ping(first, status["server_address"])
