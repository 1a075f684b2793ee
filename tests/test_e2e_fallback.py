"""Tunnel "auto" on a real machine: UDP blocked by nftables, the link comes back over gRPC."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gatekeeper.lab.siderolink_lab import WG_PORT, Machine, SideroLinkLab

pytestmark = pytest.mark.netns

GATEKEEPER = [sys.executable, "-m", "gatekeeper"]
SERVER_OVERLAY = "fdae:41e4:649b:9303::1"
# A short link timeout (fallback after 3 s without a handshake) keeps the tests brief; the
# defaults (45 s, 15 s) behave the same, only slower.
FAST = ("--link-timeout", "9")


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def block_udp(machine: Machine) -> None:
    """Drop every datagram from the machine to the server's WireGuard port."""
    rules = (
        "table inet blockudp {\n"
        f"  chain out {{ type filter hook output priority 0; udp dport {WG_PORT} drop; }}\n"
        "}\n"
    )
    subprocess.run(
        machine.ns.exec_argv(["nft", "-f", "-"]), input=rules.encode(), check=True, timeout=10
    )


def test_udp_blocked_from_the_start_falls_back_to_the_tunnel(sl: SideroLinkLab) -> None:
    sl.start_server()  # the default --tunnel-mode allow honours the machine's request
    machine = sl.add_machine(start=False)
    block_udp(machine)
    sl.start_agent(machine, *FAST)
    status = sl.wait_connected(machine, timeout=30)
    assert status["link_name"] == "siderolinktun" and status["path"] == "tunnel"
    assert "no WireGuard handshake over UDP" in status["path_reason"]
    assert sl.ping(machine, SERVER_OVERLAY)


def test_udp_dying_later_is_noticed_and_the_link_comes_back_over_the_tunnel(
    sl: SideroLinkLab,
) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    sl.start_agent(machine, *FAST)
    first = sl.wait_connected(machine, timeout=20)
    assert first["path"] == "udp"
    block_udp(machine)
    sl.wait_status(machine, lambda s: not s.get("connected"), 60, "down")
    back = sl.wait_status(
        machine, lambda s: s.get("connected") and s.get("path") == "tunnel", 60, "over the tunnel"
    )
    assert back["node_address"] == first["node_address"]
    assert sl.ping(machine, SERVER_OVERLAY)


def test_off_stays_on_udp_and_reports_the_dead_link(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    block_udp(machine)
    sl.start_agent(machine, *FAST, "--tunnel", "off")
    status = sl.wait_status(machine, lambda s: s.get("provisions", 0) >= 2, 40, "re-provisioned")
    assert not status["connected"] and status["path"] == "udp"


def test_tunnel_survives_a_server_crash(sl: SideroLinkLab) -> None:
    sl.start_server("--tunnel-mode", "always")
    machine = sl.add_machine(start=False)
    block_udp(machine)
    sl.start_agent(machine)
    first = sl.wait_connected(machine, timeout=20)
    assert first["path"] == "tunnel"
    sl.stop_server(kill=True)
    sl.start_server("--tunnel-mode", "always")
    # The agent reopens its stream after the spec's 5-10 s delay; the server knows the
    # tunnel peer again from its registry, so no new Provision is needed.
    deadline = time.monotonic() + 40
    while not sl.ping(machine, SERVER_OVERLAY, wait=1):
        assert time.monotonic() < deadline, f"no path back: {machine.status()}"
    after = machine.status()
    assert after["node_address"] == first["node_address"] and after["link_name"] == "siderolinktun"


def test_removing_a_tunnel_machine_ends_its_stream(sl: SideroLinkLab) -> None:
    sl.start_server("--tunnel-mode", "always")
    machine = sl.add_machine()
    sl.wait_connected(machine, timeout=20)
    subprocess.run(
        [*GATEKEEPER, "machines", "remove", machine.node_uuid, "--state-dir", str(sl.state_dir)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    ended = re.compile(r"tunnel peer \[[0-9a-f:]+\]:50889 removed")
    while not ended.search(sl.server_log.read_text()):
        assert time.monotonic() < deadline, sl.tail(sl.server_log)
        time.sleep(0.1)
    # The machine's token is still valid: it notices and joins again by itself.
    sl.wait_status(
        machine, lambda s: s.get("provisions", 0) >= 2 and s.get("connected"), 40, "back"
    )
