"""Join tokens end to end: `gatekeeper token` against a running server, real Provision calls
from a machine namespace, the audit log on disk."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
from fleetlab import api_target, gk, provisions

from gatekeeper.lab.siderolink_lab import SideroLinkLab
from gatekeeper.server.audit import read_audit
from gatekeeper.wireguard.keys import PrivateKey

pytestmark = pytest.mark.netns


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def req(token: str | None, node_uuid: str | None = None) -> dict[str, object]:
    return {
        "node_uuid": node_uuid or str(uuid.uuid4()),
        "node_public_key": PrivateKey.generate().public_key().base64(),
        "join_token": token,
        "node_unique_token": "",
    }


def outcome(result: dict[str, object]) -> str:
    return "OK" if "ok" in result else f"{result['code']}: {result['details']}"


def test_token_lifecycle_uses_expiry_revocation_and_audit(
    sl: SideroLinkLab, registry_args: list[str]
) -> None:
    sl.start_server(*registry_args)
    m = sl.add_machine(start=False)
    two = gk(
        sl, "token", "create", "--name", "rack-4", "--max-uses", "2", registry=registry_args
    ).stdout.strip()
    # Long enough to be used below even on a loaded machine; waited out before the expiry check.
    short_created = time.monotonic()
    short = gk(sl, "token", "create", "--expires-in", "10s", registry=registry_args).stdout.strip()
    two_id, short_id = two.split(".")[0], short.split(".")[0]
    first = str(uuid.uuid4())
    results = provisions(
        m,
        api_target(sl),
        [
            req(two, first),
            req(two),
            req(two),  # a third new machine: used up
            req(two, first),  # the first machine again (new key, as after a reboot): allowed
            req(short),
            req(sl.join_token),  # the fixed --join-token-file token still works
            req("not-a-token"),
        ],
    )
    assert [outcome(r) for r in results] == [
        "OK",
        "OK",
        "PERMISSION_DENIED: join token used up",
        "OK",
        "OK",
        "OK",
        "PERMISSION_DENIED: invalid join token",
    ]
    # The re-provision kept the machine's address.
    assert results[0]["ok"]["node_address_prefix"] == results[3]["ok"]["node_address_prefix"]

    time.sleep(max(0.0, short_created + 10.5 - time.monotonic()))
    gk(sl, "token", "revoke", two_id, registry=registry_args)
    results = provisions(m, api_target(sl), [req(short), req(two, first)])
    assert [outcome(r) for r in results] == [
        "PERMISSION_DENIED: join token expired",
        "PERMISSION_DENIED: join token revoked",
    ]

    listed = {
        t["id"]: t
        for t in json.loads(gk(sl, "token", "list", "--json", registry=registry_args).stdout)
    }
    assert listed[two_id]["state"] == "revoked" and listed[two_id]["uses"] == 2
    assert listed[short_id]["state"] == "expired" and listed[short_id]["uses"] == 1
    table = gk(sl, "token", "list", registry=registry_args).stdout
    assert "rack-4" in table and "2/2" in table

    audit = read_audit(sl.state_dir / "audit.jsonl")
    provisions_seen = [a for a in audit if a["action"] == "provision"]
    assert [a["outcome"] for a in provisions_seen] == [
        "ok", "ok", "denied", "ok", "ok", "ok", "denied", "denied", "denied",
    ]  # fmt: skip
    denied = provisions_seen[2]
    assert denied["reason"] == "join token used up" and denied["token"] == f"{two_id} (rack-4)"
    assert str(denied["from"]).startswith(f"ipv6:[{m.underlay}]")
    assert denied["node_uuid"] and denied["time"]
    assert {"token.create", "token.revoke"} <= {a["action"] for a in audit}
    # No secret anywhere: not in the audit log, the server log, nor `token list`.
    for text in (
        (sl.state_dir / "audit.jsonl").read_text(),
        sl.server_log.read_text(),
        table,
    ):
        for secret in (two.split(".")[1], short.split(".")[1], sl.join_token):
            assert secret not in text


def test_registration_limit_is_resource_exhausted(
    sl: SideroLinkLab, registry_args: list[str]
) -> None:
    sl.start_server("--max-machines", "1", *registry_args)
    m = sl.add_machine(start=False)
    first = str(uuid.uuid4())
    results = provisions(
        m,
        api_target(sl),
        [req(sl.join_token, first), req(sl.join_token), req(sl.join_token, first)],
    )
    assert [outcome(r) for r in results] == [
        "OK",
        "RESOURCE_EXHAUSTED: registration limit reached",
        "OK",
    ]
    assert len(sl.server_peers()) == 1


def test_token_commands_fail_in_one_line(sl: SideroLinkLab) -> None:
    missing = gk(sl, "token", "list", check=False)
    assert missing.returncode == 1 and "no registry" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    gk(sl, "token", "create")  # works before the server's first start
    unknown = gk(sl, "token", "revoke", "0123456789ab.secret-part", check=False)
    assert unknown.returncode == 1 and "secret-part" not in unknown.stderr
    bad = gk(sl, "token", "create", "--max-uses", "0", check=False)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
