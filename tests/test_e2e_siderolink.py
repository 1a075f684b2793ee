"""SideroLink end to end: real `gatekeeper server` and `gatekeeper agent` processes in network
namespaces, real wireguard-go, real gRPC over a veth underlay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.lab.siderolink_lab import (
    Machine,
    SideroLinkLab,
    latest_handshakes,
    registry_endpoints,
)
from gatekeeper.wireguard.keys import PrivateKey

pytestmark = pytest.mark.netns

TESTS = Path(__file__).parent
GATEKEEPER = [sys.executable, "-m", "gatekeeper"]


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def raw_provision_in(ns_machine: Machine, target: str, **fields: Any) -> dict[str, Any]:
    """Provision from inside a machine namespace with the hand-built wire client."""
    code = (
        "import json, sys, grpc\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import wirecompat\n"
        "args = json.loads(sys.argv[1])\n"
        "try:\n"
        "    print(json.dumps({'ok': wirecompat.raw_provision(**args)}))\n"
        "except grpc.RpcError as e:\n"
        "    print(json.dumps({'code': e.code().name, 'details': e.details()}))\n"
    )
    out = subprocess.run(
        ns_machine.ns.exec_argv(
            [sys.executable, "-c", code, json.dumps({"target": target, **fields})]
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_link_comes_up_and_ping_crosses_the_overlay(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    status = sl.wait_connected(machine, timeout=20)
    assert status["link_name"] == "siderolink" and status["state"] == "up"
    assert status["node_address"].startswith("fdae:41e4:649b:9303:")
    assert status["node_address"].endswith("/64")
    assert status["server_address"] == "fdae:41e4:649b:9303::1"
    assert status["backend"] == "userspace" and status["listen_port"] == 51821
    assert sl.ping(machine, status["server_address"])
    assert status["public_key"] in sl.server_peers()
    # The join token is a secret: not in the status, nor in either log.
    for text in (json.dumps(status), sl.server_log.read_text(), machine.log.read_text()):
        assert sl.join_token not in text


def test_a_joined_machine_keeps_its_overlay_while_more_machines_join_the_underlay(
    sl: SideroLinkLab,
) -> None:
    # More machines on the same underlay segment must not cut off one already joined (seen
    # when the segment's bridge changed its address as ports joined: the machine's neighbour
    # entry for the server went stale, and its link showed handshakes but carried nothing).
    sl.start_server()
    sl.add_machine(start=False)  # a port that may hold the lowest address
    machine = sl.add_machine()
    status = sl.wait_connected(machine, timeout=20)
    assert sl.ping(machine, status["server_address"])

    def server_mac_seen_by_machine() -> str:
        out = machine.ns.run(["ip", "-j", "-6", "neigh", "show", sl.server_underlay])
        return str(json.loads(out)[0]["lladdr"])

    def server_mac() -> str:
        return str(json.loads(sl.server_ns.run(["ip", "-j", "link", "show", "br0"]))[0]["address"])

    assert server_mac_seen_by_machine() == server_mac()
    # 3: NET_ADDR_SET, an address given, which the bridge never replaces with a port's (the
    # check below sees a change only when a later port's random MAC happens to be lower).
    assert sl.server_ns.run(["cat", "/sys/class/net/br0/addr_assign_type"]).strip() == "3"
    for _ in range(6):
        sl.add_machine(start=False)
        assert server_mac_seen_by_machine() == server_mac()
    assert sl.ping(machine, status["server_address"], count=3, wait=1), "overlay lost"


def test_status_command_prints_the_link(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    sl.wait_connected(machine)
    out = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "status", "--run-dir", str(machine.run_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CONNECTED" in out and "yes" in out and "siderolink" in out


def test_wrong_token_is_denied_and_adds_no_peer(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    before = sl.server_peers()
    key = PrivateKey.generate().public_key().base64()
    target = f"[{sl.server_underlay}]:8090"
    denied = raw_provision_in(
        machine, target, node_uuid=machine.node_uuid, node_public_key=key, join_token="wrong"
    )
    assert denied == {"code": "PERMISSION_DENIED", "details": "invalid join token"}
    garbage = raw_provision_in(
        machine,
        target,
        node_uuid=machine.node_uuid,
        node_public_key="not-a-key",
        join_token=sl.join_token,
    )
    assert garbage["code"] == "INVALID_ARGUMENT" and "public key" in garbage["details"]
    assert sl.server_peers() == before


def test_compat_client_built_from_field_numbers_provisions(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    key = PrivateKey.generate().public_key().base64()
    reply = raw_provision_in(
        machine,
        f"[{sl.server_underlay}]:8090",
        node_uuid=machine.node_uuid,
        node_public_key=key,
        join_token=sl.join_token,
        node_unique_token="",
    )["ok"]
    assert reply["server_endpoint"] == [f"[{sl.server_underlay}]:51820"]
    assert reply["server_address"] == "fdae:41e4:649b:9303::1"
    assert reply["node_address_prefix"].endswith("/64")
    assert key in sl.server_peers()


def test_restarted_server_keeps_its_key_and_the_machine_its_address(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    first = sl.wait_connected(machine)
    server_key_before = sl.server_peers()  # machine key on the device
    sl.stop_server()
    sl.start_server()
    # The restored device holds the machine's peer again without a new Provision.
    assert set(server_key_before) <= set(sl.server_peers())
    sl.stop_agent(machine)
    sl.start_agent(machine)
    again = sl.wait_status(
        machine,
        lambda s: s.get("connected") and s.get("public_key") != first["public_key"],
        20,
        "reconnected with a new key",
    )
    assert again["node_address"] == first["node_address"]
    assert again["server_public_key"] == first["server_public_key"]
    assert sl.ping(machine, again["server_address"])
    # The machine came back with a new key: its old peer is gone from the server.
    peers = sl.server_peers()
    assert again["public_key"] in peers and first["public_key"] not in peers


def test_agent_joins_a_minimal_server_built_from_field_numbers(sl: SideroLinkLab) -> None:
    """Proves the field numbers and the endpoint swap from the machine's side.

    The server advertises [good, dead1, dead2]; on the wire that is [dead2, dead1, good]. An
    agent that did not swap back would try a dead endpoint first and not connect in time.
    """
    good = f"[{sl.server_underlay}]:51820"
    dead1, dead2 = "[fd00:6b:1::dead]:51820", "[fd00:6b:1::beef]:51820"
    ifname = f"gk{sl.lab.lab_id}cmp"
    server = subprocess.Popen(
        sl.server_ns.exec_argv(
            [
                sys.executable,
                str(TESTS / "compat_server.py"),
                f"[{sl.server_underlay}]:8090",
                ifname,
                "51820",
                dead2,
                dead1,
                good,
            ]
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )
    try:
        assert server.stdout is not None
        assert json.loads(server.stdout.readline()) == {"ready": True}
        machine = sl.add_machine()
        status = sl.wait_connected(machine, timeout=15)
        request = json.loads(server.stdout.readline())["request"]
        assert request["node_uuid"] == machine.node_uuid
        assert request["node_public_key"] == status["public_key"]
        assert request["join_token"] == sl.join_token
        # Talos always sends one; ours is generated on first start (test_wire_conformance.py).
        assert request["node_unique_token"]
        assert "wireguard_over_grpc" not in request  # sent only when the tunnel is asked for
        assert status["endpoint"] == good
        assert status["endpoints"] == [good, dead1, dead2]
        assert status["node_address"] == "fdae:41e4:649b:9303:aaaa:bbbb:cccc:dddd/64"
        assert sl.ping(machine, "fdae:41e4:649b:9303::1")
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(timeout=10)


def test_bad_config_is_reported_and_a_fixed_one_is_picked_up(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(api_url="grpc://[fd00:6b:1::1]:99999?jointoken=" + sl.join_token)
    status = sl.wait_status(machine, lambda s: s.get("last_error"), 10, "reporting the error")
    assert "port" in status["last_error"] and "\n" not in status["last_error"]
    assert status["state"] == "unconfigured" and machine.proc and machine.proc.poll() is None
    log = machine.log.read_text()
    assert "configuration rejected" in log and sl.join_token not in log
    # Fixing the command line (as a new config document would) needs no restart.
    machine.cmdline.write_text(f"siderolink.api={sl.api_url()}\n")
    sl.wait_connected(machine, timeout=20)


def test_unreachable_server_backs_off_then_connects(sl: SideroLinkLab) -> None:
    machine = sl.add_machine()
    status = sl.wait_status(machine, lambda s: s.get("state") == "backoff", 15, "backing off")
    assert status["next_retry_in"] > 0 and "UNAVAILABLE" in status["last_error"]
    assert "retrying in" in machine.log.read_text()
    sl.start_server()
    sl.wait_connected(machine, timeout=30)


def test_server_crash_and_restart_brings_the_link_back_without_reprovisioning(
    sl: SideroLinkLab,
) -> None:
    sl.start_server()
    machine = sl.add_machine()
    first = sl.wait_connected(machine)
    deadline = time.monotonic() + 15
    while registry_endpoints(sl.state_dir).get(machine.node_uuid) is None:
        assert time.monotonic() < deadline, "the server never recorded the machine's endpoint"
        time.sleep(0.2)
    sl.stop_server(kill=True)
    restarted = time.time()
    sl.start_server()
    # The server reaches out first: a fresh handshake with the machine's key, unprompted.
    deadline = time.monotonic() + 20
    while latest_handshakes(sl.server_wg_interface).get(first["public_key"], 0) < int(restarted):
        assert time.monotonic() < deadline, "no handshake after the server restart"
        time.sleep(0.1)
    assert sl.ping(machine, first["server_address"])
    now = machine.status()
    assert now["connected"] and now["provisions"] == first["provisions"]
    assert now["node_address"] == first["node_address"]


def test_dead_path_is_noticed_within_a_minute_and_the_link_comes_back(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    sl.wait_connected(machine)
    # Cut the machine's cable at the server's bridge (a downed eth0 would also lose its
    # IPv6 address, which is a different failure).
    sl.server_ns.run(["ip", "link", "set", "v1", "down"])
    cut = time.monotonic()
    down = sl.wait_status(machine, lambda s: not s.get("connected"), 60, "down")
    noticed = time.monotonic() - cut
    assert noticed <= 60 and down["state"] != "up"
    assert "link down: nothing received from the server" in machine.log.read_text()
    sl.server_ns.run(["ip", "link", "set", "v1", "up"])
    back = sl.wait_connected(machine, timeout=30)
    assert back["node_address"] == down["node_address"]
    assert sl.ping(machine, back["server_address"])


def test_a_key_of_another_machine_is_refused(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    status = sl.wait_connected(machine)
    target = f"[{sl.server_underlay}]:8090"
    hijack = raw_provision_in(
        machine,
        target,
        node_uuid="00000000-0000-0000-0000-00000000beef",
        node_public_key=status["public_key"],
        join_token=sl.join_token,
    )
    assert hijack == {
        "code": "INVALID_ARGUMENT",
        "details": "node_public_key belongs to another machine",
    }
    assert sl.ping(machine, status["server_address"])


def server_cli(sl: SideroLinkLab, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gatekeeper", "server", "--state-dir", str(sl.state_dir)]
    return subprocess.run(
        sl.server_ns.exec_argv([*argv, *args]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_second_server_on_the_same_state_refuses_and_harms_nothing(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    status = sl.wait_connected(machine)
    second = server_cli(
        sl,
        "--listen",
        f"[{sl.server_underlay}]:8099",
        "--wireguard-interface",
        sl.server_wg_interface,
        "--endpoint",
        f"[{sl.server_underlay}]:51820",
    )
    assert second.returncode == 1
    assert "another gatekeeper server is running" in second.stderr
    assert "Traceback" not in second.stderr
    assert status["public_key"] in sl.server_peers()
    assert sl.ping(machine, status["server_address"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--endpoint", "[fd00:6b:1::1]:0"),
            "--endpoint: endpoint '[fd00:6b:1::1]:0' is not host:port: "
            "port must be a number 1..65535",
        ),
        (("--endpoint", "fd00::1:51820"), "write IPv6 addresses as [address]:port"),
        (
            ("--endpoint", "[fd00:6b:1::1]:51820", "--wireguard-backend", "kernel"),
            "kernel WireGuard not available",
        ),
    ],
)
def test_server_start_errors_are_one_line(
    sl: SideroLinkLab, args: tuple[str, ...], message: str
) -> None:
    done = server_cli(sl, "--listen", f"[{sl.server_underlay}]:8099", *args)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("gatekeeper server:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr


def test_a_new_unique_token_replaces_the_machines_identity(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    config = machine.run_dir / "siderolink.yaml"
    doc = "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: {url}\nuniqueToken: {token}\n"
    config.write_text(doc.format(url=sl.api_url(), token="before-reinstall"))
    sl.start_agent(machine, "--config", str(config))
    first = sl.wait_connected(machine)
    config.write_text(doc.format(url=sl.api_url(), token="after-reinstall"))
    second = sl.wait_status(
        machine,
        lambda s: s.get("connected") and s.get("node_address") != first["node_address"],
        30,
        "connected as its new identity",
    )
    # Same key (the agent keeps it), one machine on the server: the old identity is gone.
    assert second["public_key"] == first["public_key"]
    listed = subprocess.run(
        [*GATEKEEPER, "machines", "--json", "--state-dir", str(sl.state_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    machines = json.loads(listed.stdout)
    assert [m["address"] for m in machines] == [second["node_address"].split("/")[0]]
    assert sl.ping(machine, second["server_address"])


def test_an_oversized_unique_token_is_refused_locally_and_nothing_is_sent(
    sl: SideroLinkLab,
) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    config = machine.run_dir / "siderolink.yaml"
    secret = "u" * 2048
    config.write_text(
        f"apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: {sl.api_url()}\n"
        f"uniqueToken: {secret}\n"
    )
    sl.start_agent(machine, "--config", str(config))
    status = sl.wait_status(machine, lambda s: s.get("last_error"), 10, "reporting the error")
    assert status["last_error"].endswith("uniqueToken is longer than 1024 bytes")
    assert status["state"] == "unconfigured" and machine.proc and machine.proc.poll() is None
    time.sleep(2.5)  # a config poll (every 2 s) later: still nothing on the server
    audit = sl.state_dir / "audit.jsonl"
    assert not audit.exists() or audit.read_text() == "", "a Provision reached the server"
    assert "u" * 64 not in machine.log.read_text()
