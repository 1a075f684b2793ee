"""Wire conformance with Talos and Omni (docs/compatibility.md): what a reference peer sees.

Real `gatekeeper agent` and `gatekeeper server` processes in network namespaces; the other end
is built from the upstream field numbers (tests/wirecompat.py, tests/compat_server.py and the
descriptors of tests/test_maintenance_wire.py), never from gatekeeper/pb.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetlab import gk

from gatekeeper.lab.netns import Namespace
from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab

pytestmark = pytest.mark.netns

TESTS = Path(__file__).parent
# Omni reads talos_version with a tolerant semver parser (a leading "v" allowed) and, in its
# strict join-token mode, refuses Talos before 1.6.
SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
TUNNEL_PREFIX = ipaddress.IPv6Network("fdae:41e4:649b:9304::/64")


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def token_file(machine: Machine) -> Path:
    return machine.run_dir / "state" / "unique-token"


def test_provision_from_the_real_agent_as_a_minimal_server_captures_it(sl: SideroLinkLab) -> None:
    ifname = f"gk{sl.lab.lab_id}cmp"
    endpoint = f"[{sl.server_underlay}]:51820"
    server = subprocess.Popen(
        sl.server_ns.exec_argv(
            [
                sys.executable,
                str(TESTS / "compat_server.py"),
                f"[{sl.server_underlay}]:8090",
                ifname,
                "51820",
                endpoint,
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
        first = sl.wait_connected(machine, timeout=15)
        request = json.loads(server.stdout.readline())["request"]

        # 1: a semver Omni parses, at a Talos level its strict mode admits.
        version = SEMVER.match(request["talos_version"])
        assert version, request["talos_version"]
        assert (int(version[1]), int(version[2])) >= (1, 6)
        # 2: a unique token, generated on first start, kept 0600, secret.
        token = request["node_unique_token"]
        assert len(token) >= 32
        path = token_file(machine)
        assert path.read_text().strip() == token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert token not in machine.log.read_text()
        assert token not in (machine.run_dir / "status.json").read_text()

        # A restarted agent (a new key, in memory only) sends the same token.
        sl.stop_agent(machine)
        sl.start_agent(machine)
        again = json.loads(server.stdout.readline())["request"]
        assert again["node_unique_token"] == token
        assert again["node_public_key"] != first["public_key"]
        sl.wait_status(
            machine,
            lambda s: s.get("connected") and s.get("public_key") == again["node_public_key"],
            15,
            "reconnected",
        )
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(timeout=10)


def test_a_bad_talos_version_is_refused_at_start_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "agent", "--talos-version", "gatekeeper-0.1.0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "is not a semantic version" in done.stderr.strip().splitlines()[-1]


def test_machines_sharing_an_smbios_uuid_stay_two_machines(sl: SideroLinkLab) -> None:
    """omni#3341: without a unique token the second machine took the first one's place."""
    sl.start_server()
    a = sl.add_machine(start=False)
    b = sl.add_machine(start=False)
    b.node_uuid = a.node_uuid
    sl.start_agent(a)
    sl.start_agent(b)
    sa, sb = sl.wait_connected(a), sl.wait_connected(b)
    assert sa["node_address"] != sb["node_address"]
    assert sl.ping(a, sa["server_address"]) and sl.ping(b, sb["server_address"])
    assert {sa["public_key"], sb["public_key"]} <= set(sl.server_peers())


_FETCH = """
import json, ssl, sys
sys.path.insert(0, {tests!r})
import grpc
from test_maintenance_wire import build_classes
from gatekeeper.maintenance.client import fetch_certificate

classes = build_classes()
host, port = sys.argv[1], 50000
der = fetch_certificate(host, port)
creds = grpc.ssl_channel_credentials(ssl.DER_cert_to_PEM_cert(der).encode())
options = [("grpc.ssl_target_name_override", "maintenance-service.talos.dev")]
out = {{}}
with grpc.secure_channel(f"[{{host}}]:{{port}}", creds, options=options) as ch:
    get = ch.unary_unary(
        "/cosi.resource.State/Get",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=classes["GetResponse"].FromString,
    )
    for name, type_, id_ in (
        ("config", "SiderolinkConfigs.siderolink.talos.dev", "siderolink"),
        ("status", "SiderolinkStatuses.siderolink.talos.dev", "siderolink-status"),
        ("tunnel", "SiderolinkTunnels.siderolink.talos.dev", "siderolink-tunnel"),
    ):
        try:
            r = get(classes["GetRequest"](namespace="config", type=type_, id=id_), timeout=5)
        except grpc.RpcError as e:
            out[name] = {{"code": e.code().name}}
            continue
        spec = classes["Siderolink" + name.capitalize() + "Spec"].FromString(
            r.resource.spec.proto_spec
        )
        fields = {{f.name: v for f, v in spec.ListFields()}}
        if "node_address" in fields:
            na = fields["node_address"]
            fields["node_address"] = {{"ip": na.ip.hex(), "port": na.port}}
        out[name] = {{"fields": fields, "yaml": r.resource.spec.yaml_spec}}
print(json.dumps(out))
"""


def talosctl_get(ns: Namespace, address: str) -> dict[str, Any]:
    """Config, status and tunnel resources as a Go client decodes them (proto_spec)."""
    done = subprocess.run(
        ns.exec_argv([sys.executable, "-c", _FETCH.format(tests=str(TESTS)), address]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_resources_as_talosctl_gets_them_over_the_overlay(sl: SideroLinkLab) -> None:
    sl.start_server("--tunnel-mode", "always")
    machine = sl.add_machine()
    status = sl.wait_connected(machine, timeout=30)
    assert status["link_name"] == "siderolinktun"
    address = status["node_address"].split("/")[0]
    resources: dict[str, Any] = {}
    for _ in range(50):  # the maintenance API comes up on the new address within moments
        try:
            resources = talosctl_get(sl.server_ns, address)
            break
        except AssertionError:
            time.sleep(0.2)
    assert resources, "the maintenance API did not answer over the overlay"

    url = f"grpc://[{sl.server_underlay}]:8090?jointoken={sl.join_token}"
    # 4: an admin (the server, from the overlay) reads the sensitive config whole.
    assert resources["config"]["fields"] == {
        "api_endpoint": url,
        "host": f"[{sl.server_underlay}]:8090",
        "join_token": sl.join_token,
        "insecure": True,
    }
    # 3: the status host is bare: no brackets, no port.
    assert resources["status"]["fields"] == {
        "host": sl.server_underlay,
        "connected": True,
        "link_name": "siderolinktun",
        "grpc_tunnel": True,
    }
    assert resources["status"]["yaml"].startswith(f"host: {sl.server_underlay}\n")
    # 5: the tunnel resource, as Talos publishes it in tunnel mode.
    tunnel = resources["tunnel"]["fields"]
    assert tunnel["api_endpoint"] == url
    assert tunnel["link_name"] == "siderolinktun" and tunnel["mtu"] == 1280
    virtual = ipaddress.IPv6Address(bytes.fromhex(tunnel["node_address"]["ip"]))
    assert virtual in TUNNEL_PREFIX and tunnel["node_address"]["port"] == 50889
    assert f"nodeAddress: '[{virtual}]:50889'\n" in resources["tunnel"]["yaml"]


# -- server side ------------------------------------------------------------------------------


def wg_show(ifname: str, what: str) -> dict[str, str]:
    """`wg show IFNAME WHAT` as key -> value (the real wireguard-tools)."""
    out = subprocess.run(
        ["wg", "show", ifname, what], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if line)


_PROVISIONS = """
import json, sys
sys.path.insert(0, {tests!r})
import grpc, wirecompat
out = []
for args in json.loads(sys.argv[2]):
    try:
        out.append(wirecompat.raw_provision(sys.argv[1], **args))
    except grpc.RpcError as e:
        out.append({{"code": e.code().name, "details": e.details()}})
print(json.dumps(out))
"""


def provisions(machine: Machine, target: str, calls: list[dict[str, Any]]) -> list[Any]:
    done = subprocess.run(
        machine.ns.exec_argv(
            [sys.executable, "-c", _PROVISIONS.format(tests=str(TESTS)), target, json.dumps(calls)]
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: list[Any] = json.loads(done.stdout)
    return result


def new_key() -> str:
    from gatekeeper.wireguard.keys import PrivateKey

    return PrivateKey.generate().public_key().base64()


def test_every_server_peer_has_keepalive_25s(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    status = sl.wait_connected(machine)
    # A UDP machine that provisioned but never handshook: nowhere to send to, so no keepalive
    # yet (it would only make wireguard-go spin; docs/compatibility.md).
    quiet = sl.add_machine(start=False)
    key = new_key()
    (reply,) = provisions(
        quiet,
        f"[{sl.server_underlay}]:8090",
        [{"node_uuid": quiet.node_uuid, "node_public_key": key, "join_token": sl.join_token}],
    )
    assert reply["grpc_peer_addr_port"] == ""
    # The server turns it on once it knows the machine's endpoint (its next sync, <= 5 s).
    deadline = time.monotonic() + 15
    while (keepalive := wg_show(sl.server_wg_interface, "persistent-keepalive"))[
        status["public_key"]
    ] != "25":
        assert time.monotonic() < deadline, keepalive
        time.sleep(0.2)
    assert keepalive[key] == "off"
    # A restarted server puts it back at once, with the endpoint it had.
    sl.stop_server()
    sl.start_server()
    keepalive = wg_show(sl.server_wg_interface, "persistent-keepalive")
    assert keepalive[status["public_key"]] == "25" and keepalive[key] == "off"


def test_tunnel_reply_names_an_unguessable_stable_stream(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    target = f"[{sl.server_underlay}]:8090"
    key, other = new_key(), new_key()
    base = {"node_uuid": machine.node_uuid, "join_token": sl.join_token}
    first, again, rekeyed = provisions(
        machine,
        target,
        [
            {**base, "node_public_key": key, "wireguard_over_grpc": True},
            {**base, "node_public_key": key, "wireguard_over_grpc": True},
            {**base, "node_public_key": other, "wireguard_over_grpc": True},
        ],
    )
    virtual = first["grpc_peer_addr_port"]
    # 8: exactly [grpc_peer_addr_port], as the reference and Omni answer in tunnel mode.
    assert first["server_endpoint"] == [virtual]
    address = ipaddress.IPv6Address(virtual.rpartition(":")[0].strip("[]"))
    assert address in TUNNEL_PREFIX and virtual.endswith("]:50889")
    # 9: not derived from the overlay address, kept while the key is kept, new with a new key.
    node = ipaddress.IPv6Interface(first["node_address_prefix"]).ip
    assert address.packed[8:] != node.packed[8:]
    assert again["grpc_peer_addr_port"] == virtual
    assert rekeyed["grpc_peer_addr_port"] not in ("", virtual)
    # A restarted server (same key, same registry) keeps the name.
    sl.stop_server()
    sl.start_server()
    (after,) = provisions(
        machine, target, [{**base, "node_public_key": other, "wireguard_over_grpc": True}]
    )
    assert after["grpc_peer_addr_port"] == rekeyed["grpc_peer_addr_port"]


_OUTSIDER_STREAM = """
import json, sys
sys.path.insert(0, {tests!r})
import wirecompat
out = []
for header in json.loads(sys.argv[2]):
    with wirecompat.open_raw_stream(sys.argv[1], header, timeout=10) as stream:
        stream.send(b"\\x01" + bytes(147))  # a WireGuard handshake initiation's size
        code, details = stream.wait_end(timeout=10)
        out.append([code.name, details])
print(json.dumps(out))
"""


def test_an_outsider_cannot_displace_a_machines_stream(sl: SideroLinkLab) -> None:
    sl.start_server("--tunnel-mode", "always")
    machine = sl.add_machine()
    status = sl.wait_connected(machine, timeout=30)
    assert status["link_name"] == "siderolinktun"
    streams_before = status["tunnel_stream"]["streams"]
    outsider = sl.add_machine(start=False)
    # What an outsider can know or guess: the machine's overlay address moved into the tunnel
    # prefix (the old derivation), with either reference port.
    node = ipaddress.IPv6Interface(status["node_address"]).ip
    guessed = ipaddress.IPv6Address(TUNNEL_PREFIX.network_address.packed[:8] + node.packed[8:])
    headers = [f"[{guessed}]:50889", f"[{guessed}]:50888"]
    done = subprocess.run(
        outsider.ns.exec_argv(
            [
                sys.executable,
                "-c",
                _OUTSIDER_STREAM.format(tests=str(TESTS)),
                f"[{sl.server_underlay}]:8090",
                json.dumps(headers),
            ]
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [["PERMISSION_DENIED", "peer not allowed"]] * 2
    # The machine's own stream was never replaced: same stream, link still answering.
    assert sl.ping(machine, status["server_address"])
    now = machine.status()
    assert now["connected"] and now["tunnel_stream"]["streams"] == streams_before
    assert "peer replaced" not in machine.log.read_text()


def test_disable_last_endpoint_restores_peers_without_one(sl: SideroLinkLab) -> None:
    from gatekeeper.lab.siderolink_lab import registry_endpoints

    sl.start_server("--disable-last-endpoint")
    machine = sl.add_machine()
    status = sl.wait_connected(machine)
    deadline = time.monotonic() + 20
    while not registry_endpoints(sl.state_dir).get(machine.node_uuid):
        assert time.monotonic() < deadline, "the server never recorded the machine's endpoint"
        time.sleep(0.2)
    sl.stop_server()
    sl.start_server("--disable-last-endpoint")
    # 11: the peer is back, without the last endpoint (omni#2730: behind a load balancer).
    endpoints = wg_show(sl.server_wg_interface, "endpoints")
    assert endpoints[status["public_key"]] == "(none)"
    # Without the switch the same restart hands the peer its last endpoint at once.
    sl.stop_server()
    sl.start_server()
    endpoints = wg_show(sl.server_wg_interface, "endpoints")
    assert endpoints[status["public_key"]] == registry_endpoints(sl.state_dir)[machine.node_uuid]


_PUBLISH = """
import json, sys
import grpc
from google.protobuf import any_pb2
from gatekeeper.pb.events import events_pb2, events_pb2_grpc
out = []
options = [("grpc.max_send_message_length", 64 << 20)]
with grpc.insecure_channel(sys.argv[1], options=options) as ch:
    stub = events_pb2_grpc.EventSinkServiceStub(ch)
    for size in json.loads(sys.argv[2]):
        data = any_pb2.Any(type_url="talos/runtime/big", value=bytes(size))
        try:
            stub.Publish(events_pb2.EventRequest(id=f"e{size}", data=data), timeout=20)
            out.append("OK")
        except grpc.RpcError as e:
            out.append(e.code().name + ": " + (e.details() or ""))
print(json.dumps(out))
"""


def test_events_take_what_go_servers_take_with_a_bound_per_machine(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine()
    status = sl.wait_connected(machine)
    server = f"[{status['server_address']}]:8090"
    mib = 1 << 20
    # 1 MiB (refused before at 64 KiB), just under 4 MiB, over 4 MiB, then a flood of
    # 3 MiB events past the machine's 16 MiB budget.
    sizes = [mib, 4 * mib - 1024, 4 * mib + 1024, *[3 * mib] * 6]
    done = subprocess.run(
        machine.ns.exec_argv([sys.executable, "-c", _PUBLISH, server, json.dumps(sizes)]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert results[:2] == ["OK", "OK"]
    assert results[2].startswith("RESOURCE_EXHAUSTED")
    flood = results[3:]
    assert flood[:2] == ["OK", "OK"]  # 1 + 4 + 6 MiB so far: inside the burst
    assert any(r.startswith("RESOURCE_EXHAUSTED: event budget exceeded") for r in flood[2:])
    # Refusals are answers, not crashes.
    assert sl.server_proc is not None and sl.server_proc.poll() is None


# -- 6: names resolved at every reconnect, an HTTP CONNECT proxy --------------------------------

API_NAME = "sl.gatekeeper.test"


@contextlib.contextmanager
def netns_hosts(ns: Namespace, text: str) -> Iterator[Path]:
    """/etc/netns/NS/hosts: `ip netns exec NS` bind-mounts it over /etc/hosts for that command
    only. Rewritten in place (same inode) later, the running command sees the new lines."""
    folder = Path("/etc/netns") / ns.name
    folder.mkdir(parents=True)
    hosts = folder / "hosts"
    hosts.write_text(text)
    try:
        yield hosts
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class CompatServer:
    """The lines tests/compat_server.py prints, read on a thread so a wait can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next(self, timeout: float = 30) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"compat server printed nothing within {timeout:.0f} s") from None
        return doc


@contextlib.contextmanager
def compat_server(sl: SideroLinkLab, listen: str, endpoint: str) -> Iterator[CompatServer]:
    """tests/compat_server.py in the server namespace, printing each Provision it receives."""
    ifname = f"gk{sl.lab.lab_id}cmp"
    server = subprocess.Popen(
        sl.server_ns.exec_argv(
            [sys.executable, str(TESTS / "compat_server.py"), listen, ifname, "51820", endpoint]
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )
    try:
        lines = CompatServer(server)
        assert lines.next(timeout=15) == {"ready": True}
        yield lines
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(timeout=10)


def refuse_handshakes_from(machine: Machine, port: int) -> None:
    """Drop WireGuard handshake initiations (message type 1) from `port` at the machine.

    WireGuard lets the side that sent data start a new handshake, from wherever it now is, and
    the machine would then follow ("roam") to the server's new address by itself. Without that
    the machine gets back only by sending to the right address, which is what is tested.
    """
    machine.ns.run(["nft", "add table inet gk_test_noroam"])
    machine.ns.run(
        ["nft", "add chain inet gk_test_noroam in { type filter hook input priority -200 ; }"]
    )
    rule = f"udp sport {port} @th,64,8 1 drop"
    machine.ns.run(["nft", f"add rule inet gk_test_noroam in {rule}"])


def test_a_reconnect_resolves_the_api_name_again(sl: SideroLinkLab) -> None:
    """talos#12580: the server moves to another address under the same name."""
    old, new = sl.server_underlay, "fd00:6b:1::2"
    sl.server_ns.run(["ip", "addr", "add", f"{new}/64", "dev", "br0", "nodad"])
    url = f"grpc://{API_NAME}:8090?jointoken={sl.join_token}"
    machine = sl.add_machine(start=False, api_url=url)
    refuse_handshakes_from(machine, 51820)
    with (
        compat_server(sl, "[::]:8090", f"{API_NAME}:51820") as server,
        netns_hosts(machine.ns, f"{old} {API_NAME}\n") as hosts,
    ):
        # No default route in the lab: do not wait for one before dialling a name.
        sl.start_agent(
            machine, "--network-timeout", "0.5", "--link-timeout", "6", "--tunnel", "off"
        )
        first = sl.wait_connected(machine, timeout=30)
        assert first["endpoint"] == f"{API_NAME}:51820"
        server.next()  # the first Provision
        with hosts.open("r+") as f:  # in place: the bind mount keeps the inode
            f.write(f"{new} {API_NAME}\n")
            f.truncate()
        sl.server_ns.run(["ip", "addr", "del", f"{old}/64", "dev", "br0"])
        # The link dies (nothing answers at the old address), the agent provisions again ...
        again = server.next()["request"]
        assert again["node_public_key"] == first["public_key"]
        # ... and the link comes back only if WireGuard's endpoint was resolved again too.
        back = sl.wait_status(
            machine,
            lambda s: s.get("connected") and s.get("since", 0) > first["since"],
            30,
            "connected again at the new address",
        )
        assert back["endpoint"] == f"{API_NAME}:51820"
        assert sl.ping(machine, back["server_address"])


PROXY_PORT = 8888


def start_tinyproxy(sl: SideroLinkLab, host: Machine) -> Path:
    """Debian's tinyproxy in `host`'s namespace (stopped by PID with the lab); its log path."""
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy not found: install the Debian package tinyproxy")
    conf = sl.workdir / "tinyproxy.conf"
    conf.write_text(
        f"Port {PROXY_PORT}\nListen {host.underlay}\nAllow fd00:6b:1::/64\n"
        "ConnectPort 8090\nLogLevel Connect\nMaxClients 20\nTimeout 60\n"
    )
    log = sl.workdir / "tinyproxy.log"
    proc = sl.lab.spawn(host.ns, ["tinyproxy", "-d", "-c", str(conf)], log=log)
    deadline = time.monotonic() + 10
    probe = f"import socket; socket.create_connection(('{host.underlay}', {PROXY_PORT}), 1)"
    while subprocess.run(host.ns.exec_argv([sys.executable, "-c", probe]), check=False).returncode:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "tinyproxy did not listen"
        time.sleep(0.1)
    return log


def block_direct_api(sl: SideroLinkLab, machine: Machine) -> None:
    """The machine may not reach the API port itself (WireGuard's UDP still may)."""
    machine.ns.run(["nft", "add table inet gk_test_noapi"])
    machine.ns.run(
        ["nft", "add chain inet gk_test_noapi out { type filter hook output priority 0 ; }"]
    )
    rule = f"ip6 daddr {sl.server_underlay} tcp dport 8090 drop"
    machine.ns.run(["nft", f"add rule inet gk_test_noapi out {rule}"])


def test_provision_and_the_tunnel_go_through_an_http_connect_proxy(sl: SideroLinkLab) -> None:
    """talos#11703: https_proxy / no_proxy from the environment, as Talos's dialer uses."""
    sl.start_server("--tunnel-mode", "always")
    proxy_host = sl.add_machine(start=False)
    proxy_log = start_tinyproxy(sl, proxy_host)
    machine = sl.add_machine(start=False)
    # Events go to the server's overlay address: over WireGuard, never via the proxy.
    machine.cmdline.write_text(
        f"siderolink.api={sl.api_url()} talos.events.sink=[fdae:41e4:649b:9303::1]:8090\n"
    )
    block_direct_api(sl, machine)
    proxy = f"http://[{proxy_host.underlay}]:{PROXY_PORT}"
    sl.start_agent(machine, env={"https_proxy": proxy, "no_proxy": ""})
    status = sl.wait_connected(machine, timeout=30)
    assert status["link_name"] == "siderolinktun"  # CreateStream, too, went through it
    assert sl.ping(machine, status["server_address"])
    deadline = time.monotonic() + 20
    while not gk(sl, "events", "--json", "--machine", machine.node_uuid).stdout.strip():
        assert time.monotonic() < deadline, "no event arrived over the overlay"
        time.sleep(0.3)
    # One CONNECT for Provision, one for CreateStream.
    text = proxy_log.read_text()
    assert text.count(f"CONNECT [{sl.server_underlay}]:8090 HTTP/1.1") >= 2, text


def test_no_proxy_names_hosts_that_are_dialled_directly(sl: SideroLinkLab) -> None:
    sl.start_server()
    machine = sl.add_machine(start=False)
    # A proxy that does not exist: only no_proxy can make this work.
    env = {"https_proxy": "http://[fd00:6b:1::fe]:8888", "no_proxy": sl.server_underlay}
    sl.start_agent(machine, env=env)
    sl.wait_connected(machine, timeout=30)
