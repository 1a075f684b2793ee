"""The agent's ingress firewall with a real link: block mode keeps the overlay working."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatekeeper.lab.netns import Namespace
from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab

pytestmark = pytest.mark.netns

FIREWALL = [sys.executable, "-m", "gatekeeper", "firewall"]
UNDERLAY_8080 = ["--iif", "eth0", "--src", "fd00:6b:1::1", "--proto", "tcp", "--dport", "8080"]
BLOCK = "apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: block\n"
LISTENER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(sys.argv[1])))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.close()
    """
)


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def tcp_connects(ns: Namespace, address: str, port: int) -> bool:
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET6)\n"
        "s.settimeout(1.5)\n"
        f"sys.exit(s.connect_ex(({address!r}, {port})))\n"
    )
    done = subprocess.run(
        ns.exec_argv([sys.executable, "-c", code]), capture_output=True, timeout=10, check=False
    )
    return done.returncode == 0


def start_listener(sl: SideroLinkLab, machine: Machine, port: int) -> None:
    proc = sl.lab.spawn(machine.ns, [sys.executable, "-c", LISTENER, str(port)])
    deadline = 50
    while deadline and not tcp_connects(machine.ns, "::1", port):
        deadline -= 1
    assert proc.poll() is None


def block_mode_machine(sl: SideroLinkLab, *documents: str) -> tuple[Machine, dict[str, str]]:
    sl.start_server()
    machine = sl.add_machine(start=False)
    policy = machine.run_dir / "firewall.yaml"
    policy.write_text("---\n".join([BLOCK, *documents]))
    sl.start_agent(machine, "--firewall-config", str(policy))
    return machine, sl.wait_connected(machine, timeout=20)


def test_block_mode_drops_the_underlay_and_keeps_the_overlay(sl: SideroLinkLab) -> None:
    machine, status = block_mode_machine(sl)
    assert status["firewall"] == "ok"
    start_listener(sl, machine, 8080)
    overlay = status["node_address"].split("/")[0]
    assert tcp_connects(sl.server_ns, overlay, 8080)
    assert not tcp_connects(sl.server_ns, machine.underlay, 8080)
    # The link came up through the firewall (WireGuard port admitted, Provision answered) and
    # carries traffic both ways.
    assert sl.ping(machine, status["server_address"])
    # Without -c, `show` compares the kernel with the documents the running agent enforces.
    show = subprocess.run(
        machine.ns.exec_argv([*FIREWALL, "show", "--json", "--run-dir", str(machine.run_dir)]),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    report = json.loads(show.stdout)
    assert report["in_sync"] is True, show.stdout
    explained = subprocess.run(
        machine.ns.exec_argv(
            [*FIREWALL, "explain", "--json", "--run-dir", str(machine.run_dir), *UNDERLAY_8080]
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(explained.stdout)["verdict"] == "drop"


def test_a_rule_opens_a_port_to_one_subnet_only(sl: SideroLinkLab) -> None:
    rule = textwrap.dedent(
        """\
        apiVersion: v1alpha1
        kind: NetworkRuleConfig
        name: web-from-server
        portSelector:
          ports: [8080]
          protocol: tcp
        ingress:
          - subnet: fd00:6b:1::1/128
        """
    )
    machine, _ = block_mode_machine(sl, rule)
    start_listener(sl, machine, 8080)
    start_listener(sl, machine, 8081)
    assert tcp_connects(sl.server_ns, machine.underlay, 8080)
    assert not tcp_connects(sl.server_ns, machine.underlay, 8081)
    other = sl.add_machine(start=False)
    assert not tcp_connects(other.ns, machine.underlay, 8080)


def test_invalid_new_policy_keeps_the_one_in_force(sl: SideroLinkLab) -> None:
    machine, _ = block_mode_machine(sl)
    start_listener(sl, machine, 8080)
    policy = machine.run_dir / "firewall.yaml"
    policy.write_text(BLOCK.replace("block", "sometimes"))
    status = sl.wait_status(machine, lambda s: s.get("firewall") == "error", 10, "firewall error")
    assert "firewall.yaml" in status["firewall_error"]
    assert not tcp_connects(sl.server_ns, machine.underlay, 8080)
    assert sl.ping(machine, status["server_address"])


def test_firewall_documents_may_share_the_siderolink_config_file(
    sl: SideroLinkLab, tmp_path: Path
) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    config = machine.run_dir / "machine.yaml"
    config.write_text(
        f"apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: {sl.api_url()}\n---\n{BLOCK}"
    )
    sl.start_agent(machine, "--config", str(config))
    status = sl.wait_connected(machine)
    assert status["config_source"].startswith(str(config))
    start_listener(sl, machine, 8080)
    assert not tcp_connects(sl.server_ns, machine.underlay, 8080)
