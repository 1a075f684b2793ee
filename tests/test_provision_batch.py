"""Provisions that arrive together are answered together (server/batcher.py): one UAPI set and
one store commit per batch, and each caller still gets what it would have got alone. Real
server, real wireguard-go, real SQLite, the storm client in a namespace."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from fleetlab import STORM, gk

from gatekeeper.lab.siderolink_lab import SideroLinkLab
from gatekeeper.server.audit import AUDIT_NAME, read_audit
from gatekeeper.wireguard.keys import PrivateKey

pytestmark = pytest.mark.netns


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def test_a_storm_on_a_limited_token_admits_exactly_its_uses(sl: SideroLinkLab) -> None:
    sl.start_server()
    token = gk(sl, "token", "create", "--max-uses", "150").stdout.strip()
    m = sl.add_machine(start=False)
    out = sl.workdir / "answered.jsonl"
    done = subprocess.run(
        m.ns.exec_argv([
            sys.executable, str(STORM), f"[{sl.server_underlay}]:8090",
            "--count", "200", "--concurrency", "200", "--channels", "4",
            f"--token-file={sl.token_file(token, 'limited-token')}", "--out", str(out),
        ]),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["outcomes"] == {"OK": 150, "PERMISSION_DENIED": 50}, summary
    answered = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({a["address"] for a in answered}) == 150
    # The device holds exactly the answered machines: none of the refused ones' peers stayed.
    assert sorted(sl.server_peers()) == sorted(a["key"] for a in answered)
    listed = json.loads(gk(sl, "machines", "--json").stdout)
    assert {r["uuid"]: r["address"] for r in listed} == {a["uuid"]: a["address"] for a in answered}
    (used,) = json.loads(gk(sl, "token", "list", "--json").stdout)
    assert (used["state"], used["uses"]) == ("used up", 150)
    # The audit has a whole line for each answered machine (a batch's lines are one write).
    audit = [a for a in read_audit(sl.state_dir / AUDIT_NAME) if a["action"] == "provision"]
    assert sorted(str(a["address"]) for a in audit if a["outcome"] == "ok") == sorted(
        a["address"] for a in answered
    )
    assert {a["outcome"] for a in audit} <= {"ok", "denied", "rate_limited"}, audit
    # Batched: fewer commits than Provisions (the server logs each batch of more than one).
    sizes = [int(n) for n in re.findall(r"(\d+) Provisions answered as one batch", log(sl))]
    assert sizes and max(sizes) > 1, "no two Provisions shared a batch"
    print(f"{len(sizes)} batches of more than one, largest {max(sizes)}")


def log(sl: SideroLinkLab) -> str:
    return sl.server_log.read_text()


_SAME = """
import asyncio, json, sys
import grpc
from gatekeeper.pb.siderolink import provision_pb2, provision_pb2_grpc

async def main():
    target, token, uuid, key, n = sys.argv[1:6]
    async with grpc.aio.insecure_channel(target) as ch:
        stub = provision_pb2_grpc.ProvisionServiceStub(ch)
        req = provision_pb2.ProvisionRequest(node_uuid=uuid, node_public_key=key, join_token=token)
        calls = [stub.Provision(req, timeout=60) for _ in range(int(n))]
        out = []
        for r in await asyncio.gather(*calls, return_exceptions=True):
            out.append(r.node_address_prefix if hasattr(r, "node_address_prefix") else repr(r))
    print(json.dumps(out))

asyncio.run(main())
"""


def test_one_machine_provisioning_a_hundred_times_at_once(sl: SideroLinkLab) -> None:
    # A machine retrying in a tight loop (or someone replaying its request): every call is
    # decided after the one before it has settled, and the answers agree.
    sl.start_server()
    m = sl.add_machine(start=False)
    key = PrivateKey.generate().public_key().base64()
    node = str(uuid.uuid4())
    done = subprocess.run(
        m.ns.exec_argv([sys.executable, "-c", _SAME, f"[{sl.server_underlay}]:8090",
                        sl.join_token, node, key, "100"]),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert len(answers) == 100 and len(set(answers)) == 1, set(answers)
    assert answers[0].endswith("/64")
    assert sl.server_peers() == [key]
    (row,) = json.loads(gk(sl, "machines", "--json").stdout)
    assert row["provisions"] == 100 and row["address"] == answers[0].split("/")[0]
