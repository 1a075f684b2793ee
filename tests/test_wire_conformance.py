"""Wire conformance with Talos and Omni (docs/compatibility.md): what a reference peer sees.

Real `gatekeeper agent` and `gatekeeper server` processes in network namespaces; the other end
is built from the upstream field numbers (tests/wirecompat.py, tests/compat_server.py and the
descriptors of tests/test_maintenance_wire.py), never from gatekeeper/pb.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
