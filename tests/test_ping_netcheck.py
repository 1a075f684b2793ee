"""`gatekeeper ping` and `gatekeeper netcheck` on a machine, against a real server: what they
print and how they exit while the link is up, over UDP and over the gRPC tunnel, and once the
server is gone; over TLS, a certificate the machine does not trust."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetlab import gk
from test_e2e_tls import self_signed  # the TLS tests' certificate maker

from gatekeeper.lab.siderolink_lab import API_PORT, WG_PORT, Machine, SideroLinkLab

pytestmark = pytest.mark.netns

SERVER = "fdae:41e4:649b:9303::1"


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def on_machine(
    m: Machine, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gatekeeper", *args, "--run-dir", str(m.run_dir)]
    return subprocess.run(
        m.ns.exec_argv(argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def checks(done: subprocess.CompletedProcess[str]) -> dict[str, list[dict[str, Any]]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for check in json.loads(done.stdout)["checks"]:
        by_name.setdefault(check["name"], []).append(check)
    return by_name


def test_ping_and_netcheck_over_udp_then_with_the_server_gone(sl: SideroLinkLab) -> None:
    sl.start_server()
    m = sl.add_machine()
    sl.wait_connected(m)
    endpoint = f"[{sl.server_underlay}]:{WG_PORT}"

    ping = on_machine(m, "ping", "--count", "3", "--interval", "0.2")
    assert ping.returncode == 0, ping.stderr
    lines = ping.stdout.splitlines()
    assert lines[0] == f"PING {SERVER} (the server) over siderolink, via UDP {endpoint}"
    assert [line.split(" time ")[0] for line in lines[1:4]] == [
        f"reply from {SERVER}: seq {n}" for n in (1, 2, 3)
    ]
    assert lines[4].startswith("3 sent, 3 received, 0% loss, rtt min/avg/max ")

    as_json = json.loads(on_machine(m, "ping", "--count", "2", "--json").stdout)
    assert as_json["path"] == "udp" and as_json["received"] == 2
    assert all(0 < rtt < 1000 for rtt in as_json["rtt_ms"])

    net = on_machine(m, "netcheck", "--json")
    assert net.returncode == 0, net.stdout
    found = checks(net)
    assert [c["ok"] for c in found["api"]] == [True]
    assert found["api"][0]["target"] == f"[{sl.server_underlay}]:{API_PORT}"
    assert found["grpc"][0]["detail"] == "gRPC (plaintext h2c) connects"
    (udp,) = found["udp"]
    assert udp["target"] == endpoint and "in use, handshake" in udp["detail"]
    assert found["overlay"][0]["ok"] and found["mtu"][0]["ok"]
    assert "1280-byte echo answered" in found["mtu"][0]["detail"]
    text = on_machine(m, "netcheck")
    assert text.returncode == 0 and "ok    mtu" in text.stdout

    # A proxy in the environment: gRPC dials through it (here: nothing listens there), and
    # netcheck names it without the credentials in its URL.
    proxy = {"https_proxy": f"http://ops:s3cret@[{sl.server_underlay}]:3999"}
    proxied = on_machine(m, "netcheck", "--json", env=proxy)
    assert proxied.returncode == 3 and "s3cret" not in proxied.stdout
    (grpc_check,) = checks(proxied)["grpc"]
    assert not grpc_check["ok"] and grpc_check["detail"] == (
        f"no gRPC (HTTP/2) connection through the proxy https_proxy=http://[{sl.server_underlay}]:3999"
    )

    sl.stop_server()
    gone = on_machine(m, "ping", "--count", "1", "--timeout", "1")
    assert gone.returncode == 1
    assert "no reply from" in gone.stdout
    assert "the server did not answer over the overlay (via UDP" in gone.stderr
    net = on_machine(m, "netcheck", "--json")
    assert net.returncode == 1
    found = checks(net)
    assert not found["api"][0]["ok"] and "refused" in found["api"][0]["detail"]
    assert not found["overlay"][0]["ok"]
    assert "the server cannot be reached" in net.stderr


def test_ping_names_the_tunnel_and_refuses_without_an_agent(sl: SideroLinkLab) -> None:
    sl.start_server()
    m = sl.add_machine(api_url=sl.api_url(grpc_tunnel="true"))
    sl.wait_status(m, lambda s: s.get("connected") and s.get("tunnel"), 30, "on the tunnel")
    ping = on_machine(m, "ping", "--count", "1")
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.splitlines()[0] == (
        f"PING {SERVER} (the server) over siderolinktun, "
        f"via the gRPC tunnel to [{sl.server_underlay}]:{API_PORT}"
    )

    nowhere = sl.workdir / "no-agent"
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "ping", "--run-dir", str(nowhere)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"gatekeeper ping: no agent status at {nowhere}/status.json")


def test_netcheck_over_tls_names_a_certificate_it_does_not_trust(
    sl: SideroLinkLab, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path, sl.server_underlay)
    sl.start_server("--tls-cert", str(cert), "--tls-key", str(key))
    config = gk(sl, "join-config", "--token-file", str(sl.workdir / "join-token")).stdout
    assert config.startswith(f"siderolink.api=https://[{sl.server_underlay}]:{API_PORT}?")
    m = sl.add_machine(start=False)
    m.cmdline.write_text(config)
    trust = {"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert)}
    sl.start_agent(m, env=trust)
    sl.wait_connected(m)

    trusted = on_machine(m, "netcheck", "--json", env=trust)
    assert trusted.returncode == 0, trusted.stdout
    (grpc_check,) = checks(trusted)["grpc"]
    assert grpc_check["ok"] and grpc_check["detail"].startswith("gRPC over TLSv1")

    untrusted = on_machine(m, "netcheck", "--json")
    assert untrusted.returncode == 3  # reachable, but a check failed
    (grpc_check,) = checks(untrusted)["grpc"]
    assert not grpc_check["ok"]
    assert grpc_check["detail"].startswith("TLS certificate refused: ")
