"""WireGuard over gRPC end to end: real `gatekeeper server` and `gatekeeper agent` processes in
network namespaces, wireguard-go on both ends, the tunnel's relays in between."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from gatekeeper.lab.siderolink_lab import WG_PORT, Machine, SideroLinkLab

pytestmark = pytest.mark.netns

SERVER_OVERLAY = "fdae:41e4:649b:9303::1"
TCP_PORT = 7007

ECHO_SERVER = f"""
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SERVER_OVERLAY}", {TCP_PORT}))
s.listen()
while True:
    c, _ = s.accept()
    with c:
        while data := c.recv(65536):
            c.sendall(data)
"""

ECHO_CLIENT = f"""
import socket, sys
payload = bytes(range(256)) * 400  # 100 KiB: many full-size datagrams each way
with socket.create_connection(("{SERVER_OVERLAY}", {TCP_PORT}), timeout=10) as c:
    c.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
sys.exit(0 if got == payload else 1)
"""


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def block_direct_udp(machine: Machine) -> None:
    """The machine's own firewall drops every datagram to the server's WireGuard port."""
    rules = (
        "table inet blockwg {\n"
        "  chain out { type filter hook output priority 0; udp dport "
        f"{WG_PORT} counter drop; }}\n"
        "}\n"
    )
    subprocess.run(
        machine.ns.exec_argv(["nft", "-f", "-"]), input=rules.encode(), check=True, timeout=10
    )


def server_endpoints(sl: SideroLinkLab) -> dict[str, str]:
    out = subprocess.run(
        ["wg", "show", sl.server_wg_interface, "endpoints"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return dict(line.split("\t") for line in out.splitlines() if "\t" in line)


def tcp_echo_works(sl: SideroLinkLab, machine: Machine) -> bool:
    sl.lab.spawn(sl.server_ns, [sys.executable, "-c", ECHO_SERVER], log=sl.workdir / "echo.log")
    for _ in range(50):  # the listener takes a moment to bind
        done = subprocess.run(
            machine.ns.exec_argv([sys.executable, "-c", ECHO_CLIENT]),
            capture_output=True,
            timeout=30,
            check=False,
        )
        if done.returncode == 0:
            return True
        subprocess.run(["sleep", "0.1"], check=True)
    return False


def test_tunnel_for_everyone_carries_ping_and_tcp_when_udp_is_blocked(sl: SideroLinkLab) -> None:
    sl.start_server("--tunnel-mode", "always")
    machine = sl.add_machine(start=False)
    block_direct_udp(machine)
    sl.start_agent(machine)
    status = sl.wait_connected(machine, timeout=20)
    assert status["link_name"] == "siderolinktun" and status["tunnel"] is True
    stream = status["tunnel_stream"]
    assert stream["state"] == "open" and stream["batching"] is True
    assert sl.ping(machine, SERVER_OVERLAY, count=2, wait=2)
    assert tcp_echo_works(sl, machine)
    # The server's device reaches the machine through its relay socket on loopback.
    endpoint = server_endpoints(sl)[status["public_key"]]
    assert endpoint.startswith("127.0.0.1:")
    # Nothing went the direct way: the machine's WireGuard peer is its local relay.
    counters = machine.ns.run(["nft", "list", "table", "inet", "blockwg"])
    assert "packets 0 " in counters
    log = sl.server_log.read_text()
    assert "stream open" in log and sl.join_token not in log


def test_allow_mode_tunnels_only_the_machines_that_ask(sl: SideroLinkLab) -> None:
    sl.start_server("--tunnel-mode", "allow")
    asking = sl.add_machine(api_url=sl.api_url(grpc_tunnel="true"))
    plain = sl.add_machine()
    a = sl.wait_connected(asking, timeout=20)
    p = sl.wait_connected(plain, timeout=20)
    assert a["link_name"] == "siderolinktun" and a["tunnel_stream"]["state"] == "open"
    assert p["link_name"] == "siderolink" and p["tunnel_stream"] is None
    assert sl.ping(asking, SERVER_OVERLAY) and sl.ping(plain, SERVER_OVERLAY)


def test_tunnel_off_ignores_the_hint(sl: SideroLinkLab) -> None:
    sl.start_server("--tunnel-mode", "off")
    machine = sl.add_machine(api_url=sl.api_url(grpc_tunnel="true"))
    status = sl.wait_connected(machine, timeout=20)
    assert status["link_name"] == "siderolink" and status["tunnel"] is False
