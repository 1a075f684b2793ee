"""Bad input at a running server: garbage and oversized requests get clear status codes, a
flood of bad tokens from one address is cut off cheaply, and connected machines notice
nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from fleetlab import api_target, provisions, scrape

from gatekeeper.lab.siderolink_lab import SideroLinkLab
from gatekeeper.server.audit import read_audit
from gatekeeper.wireguard.keys import PrivateKey

pytestmark = pytest.mark.netns

_RAW = """
import json, sys, grpc
out = []
with grpc.insecure_channel(sys.argv[1]) as ch:
    call = ch.unary_unary("/sidero.link.ProvisionService/Provision")
    garbage = b"\\xff\\xff\\xff\\xff garbage"
    truncated = b"\\x0a" + b"\\xff" * 9 + b"\\x01"
    for payload in (garbage, truncated, b"x" * 100000):
        try:
            call(payload, timeout=5)
            out.append("OK")
        except grpc.RpcError as e:
            out.append(f"{e.code().name}: {e.details()}")
print(json.dumps(out))
"""


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def req(token: str) -> dict[str, object]:
    return {
        "node_uuid": str(uuid.uuid4()),
        "node_public_key": PrivateKey.generate().public_key().base64(),
        "join_token": token,
    }


METRICS_PORT = 9108


def test_garbage_oversized_and_floods(sl: SideroLinkLab) -> None:
    sl.start_server("--metrics-listen", f"[{sl.server_underlay}]:{METRICS_PORT}")
    good = sl.add_machine()
    status = sl.wait_connected(good)
    peers_before = set(sl.server_peers())

    # The attacker sits in another /64 (the limiter counts failures per /64).
    attacker = sl.add_machine(start=False)
    sl.server_ns.run(["ip", "addr", "add", "fd00:6c::1/64", "dev", "br0", "nodad"])
    attacker.ns.run(["ip", "addr", "add", "fd00:6c::2/64", "dev", "eth0", "nodad"])
    attacker.ns.run(
        ["ip", "-6", "route", "replace", f"{sl.server_underlay}/128", "dev", "eth0",
         "src", "fd00:6c::2"]
    )  # fmt: skip

    done = subprocess.run(
        attacker.ns.exec_argv([sys.executable, "-c", _RAW, api_target(sl)]),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    garbage, truncated, oversized = json.loads(done.stdout)
    assert garbage == "INVALID_ARGUMENT: request is not a valid ProvisionRequest"
    assert truncated.startswith("INVALID_ARGUMENT")
    assert oversized.startswith("RESOURCE_EXHAUSTED")
    # An operator's dashboard sees them (they never reach the guard that counts the rest;
    # the oversized one is refused by gRPC before any Gatekeeper code).
    assert 'gatekeeper_provisions_total{outcome="invalid"} 2.0' in scrape(sl, METRICS_PORT)

    results = provisions(attacker, api_target(sl), [req("wrong") for _ in range(120)])
    codes = [r.get("code") for r in results]
    assert codes[0] == "PERMISSION_DENIED"
    assert codes[-1] == "RESOURCE_EXHAUSTED"
    assert 15 <= codes.count("PERMISSION_DENIED") <= 25
    assert results[-1]["details"].startswith("too many failed provisions")
    # The limit counts failures, and a valid token is never refused for them: the right
    # token from that very source still gets in (a machine behind the flooder's NAT).
    through = req(sl.join_token)
    (passed,) = provisions(attacker, api_target(sl), [through])
    assert "ok" in passed

    # Nobody else noticed: the connected machine still talks to the server, another source
    # still provisions, and no peer was added for any rejected request.
    assert sl.ping(good, status["server_address"])
    newcomer = req(sl.join_token)
    (fine,) = provisions(good, api_target(sl), [newcomer])
    assert "ok" in fine
    assert set(sl.server_peers()) == peers_before | {
        newcomer["node_public_key"],
        through["node_public_key"],
    }
    assert sl.wait_connected(good)["connected"]

    audit = read_audit(sl.state_dir / "audit.jsonl")
    assert [a["outcome"] for a in audit].count("rate_limited") == 1
    log = sl.server_log.read_text()
    assert log.count("rejected") <= 30 and "rate limited" in log
