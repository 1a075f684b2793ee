"""Who a machine is, under attack: a connected machine's identity cannot be taken over from
another namespace, a duplicate UUID is a visible conflict (not a silent replacement), low-order
keys and UUIDs that are not UUIDs are refused, and client strings never reach the server's log
or the operator's terminal raw."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from fleetlab import api_target, gk, provisions

from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab
from gatekeeper.server.audit import read_audit
from gatekeeper.wireguard.keys import PrivateKey

pytestmark = pytest.mark.netns

# Every encoding of an X25519 point of small order once the top bit is masked, as RFC 7748
# and WireGuard do (0, 1, two points of order 8, p-1, p, p+1), hex.
LOW_ORDER = [
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
]


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def req(token: str, node_uuid: str | None = None, **fields: object) -> dict[str, object]:
    return {
        "node_uuid": node_uuid or str(uuid.uuid4()),
        "node_public_key": PrivateKey.generate().public_key().base64(),
        "join_token": token,
        "node_unique_token": "",
        **fields,
    }


def outcome(result: dict[str, object]) -> str:
    return "OK" if "ok" in result else f"{result['code']}: {result['details']}"


def allowed_ips(sl: SideroLinkLab) -> dict[str, str]:
    out = subprocess.run(
        ["wg", "show", sl.server_wg_interface, "allowed-ips"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    return {key: ips for key, _, ips in (line.partition("\t") for line in out.splitlines())}


def with_unique_token(sl: SideroLinkLab, machine: Machine, token: str) -> None:
    config = machine.run_dir / "siderolink.yaml"
    config.write_text(
        f"apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: {sl.api_url()}\n"
        f"uniqueToken: {token}\n"
    )
    sl.start_agent(machine, "--config", str(config))


def test_a_connected_identity_cannot_be_taken_over(sl: SideroLinkLab) -> None:
    sl.start_server()
    victim = sl.add_machine(start=False)
    with_unique_token(sl, victim, "victims-own-secret")
    status = sl.wait_connected(victim)
    address = status["node_address"].split("/")[0]
    # The attacker has the join token, the victim's UUID and its public key, and provisions
    # from another namespace (another underlay address) with another unique token.
    attacker = sl.add_machine(start=False)
    steal = req(
        sl.join_token, victim.node_uuid,
        node_public_key=status["public_key"], node_unique_token="attackers-guess",
    )  # fmt: skip
    results = provisions(attacker, api_target(sl), [steal] * 5)
    assert [outcome(r) for r in results] == [
        "INVALID_ARGUMENT: node_public_key belongs to another machine"
    ] * 5
    # Nothing moved: one record at the victim's address, its peer still allows only that
    # address, and the victim still talks to the server.
    (row,) = json.loads(gk(sl, "machines", "--json").stdout)
    assert row["address"] == address and row["public_key"] == status["public_key"]
    assert allowed_ips(sl)[status["public_key"]] == f"{address}/128"
    assert sl.ping(victim, status["server_address"])
    assert sl.wait_connected(victim)["node_address"] == status["node_address"]
    denied = [a for a in read_audit(sl.state_dir / "audit.jsonl") if a["outcome"] == "invalid"]
    assert len(denied) == 5 and denied[0]["conflict_with"] == address
    assert str(denied[0]["from"]).startswith(f"ipv6:[{attacker.underlay}]")


def test_a_duplicate_uuid_is_a_visible_conflict(sl: SideroLinkLab) -> None:
    sl.start_server()
    first = sl.add_machine()
    status = sl.wait_connected(first)
    address = status["node_address"].split("/")[0]
    # A clone: a copy of the whole disk (the same SMBIOS UUID and the same kept unique
    # token), its own key, another host.
    clone = sl.add_machine(start=False)
    token = (first.run_dir / "state" / "unique-token").read_text().strip()
    twin = req(sl.join_token, first.node_uuid, node_unique_token=token)
    (result,) = provisions(clone, api_target(sl), [twin])
    assert outcome(result).startswith(
        "ALREADY_EXISTS: node_uuid is in use by another connected machine"
    )
    # The connected machine keeps its peer and its link; the clone got no peer.
    peers = sl.server_peers()
    assert status["public_key"] in peers and twin["node_public_key"] not in peers
    assert sl.ping(first, status["server_address"])
    (row,) = json.loads(gk(sl, "machines", "--json").stdout)
    assert row["public_key"] == status["public_key"] and row["address"] == address
    assert row["conflict"]["from"] == clone.underlay and row["conflict"]["time"]
    table = gk(sl, "machines").stdout
    assert "CONFLICT" in table and f"{clone.underlay} " in table and "1 with CONFLICT" in table
    (line,) = [a for a in read_audit(sl.state_dir / "audit.jsonl") if a["outcome"] == "conflict"]
    assert line["conflict_with"] == address and line["node_uuid"] == first.node_uuid
    assert "claims its identity while it is connected" in sl.server_log.read_text()

    # The same machine restarting (a new key, from where its session came from) is no
    # conflict: it replaces its own peer at once and keeps its address.
    sl.stop_agent(first)
    sl.start_agent(first)
    again = sl.wait_status(
        first,
        lambda s: s.get("connected") and s.get("public_key") != status["public_key"],
        30,
        "reconnected with a new key",
    )
    assert again["node_address"] == status["node_address"]


def test_low_order_keys_and_non_uuids_are_refused_and_never_printed_raw(
    sl: SideroLinkLab,
) -> None:
    sl.start_server()
    m = sl.add_machine(start=False)
    low = [
        req(sl.join_token, node_public_key=base64.b64encode(bytes.fromhex(h)).decode())
        for h in LOW_ORDER
    ]
    forged = "x\n2026-12-02 06:00:00,000 INFO gatekeeper.server: forged line"
    bad_uuids = [
        forged,
        "6e0a5c7a-0000-4000-8000-00000000000\r",
        "\x1b[31mred\x1b[0m",
        "6e0a5c7a-0000-4000-8000-000000000001\x00",
        "not-a-uuid",
    ]
    bad_version = req(sl.join_token, talos_version="v1.9.0\x1b[2J")
    results = provisions(
        m, api_target(sl), [*low, *(req(sl.join_token, u) for u in bad_uuids), bad_version]
    )
    assert outcome(results.pop()) == "INVALID_ARGUMENT: talos_version holds control characters"
    for r in results[: len(low)]:
        assert outcome(r).startswith("INVALID_ARGUMENT: invalid WireGuard public key"), r
        assert "low-order" in str(r["details"])
    for r in results[len(low) :]:
        assert r["code"] == "INVALID_ARGUMENT" and "is not a UUID" in r["details"], r
        assert not any(c in r["details"] for c in "\n\r\x1b\x00")
    assert sl.server_peers() == []
    assert json.loads(gk(sl, "machines", "--json").stdout) == []
    log = sl.server_log.read_text()
    assert "x\\n2026-12-02" in log and "\\x1b[31m" in log
    assert not any(line.startswith("2026-12-02 06:00:00") for line in log.splitlines())
    assert "\x1b" not in log and "\x00" not in log and "\r" not in log


_PUBLISH = """
import json, sys, grpc
from google.protobuf import any_pb2
from gatekeeper.pb.events import events_pb2
out = []
with grpc.insecure_channel(sys.argv[1]) as ch:
    call = ch.unary_unary("/events.EventSinkService/Publish")
    struct = "type.googleapis.com/google.protobuf.Struct"
    for payload in (
        b"\\xff\\xff\\xff garbage",
        events_pb2.EventRequest(
            id="g", data=any_pb2.Any(type_url=struct, value=b"\\xff\\x01 not a struct")
        ).SerializeToString(),
        events_pb2.EventRequest(id="ok").SerializeToString(),
    ):
        try:
            call(payload, timeout=5)
            out.append("OK")
        except grpc.RpcError as e:
            out.append(f"{e.code().name}: {e.details()}")
print(json.dumps(out))
"""


def test_garbage_events_are_invalid_argument(sl: SideroLinkLab) -> None:
    sl.start_server()
    m = sl.add_machine()
    status = sl.wait_connected(m)
    done = subprocess.run(
        m.ns.exec_argv(
            [sys.executable, "-c", _PUBLISH, f"[{status['server_address']}]:8090"]
        ),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        "INVALID_ARGUMENT: request is not a valid EventRequest",
        "INVALID_ARGUMENT: data is not a valid google.protobuf.Struct",
        "OK",
    ]
    assert "Traceback" not in sl.server_log.read_text()


def test_a_tunnelled_identity_moves_only_from_where_its_stream_comes(sl: SideroLinkLab) -> None:
    """A tunnel peer's device endpoint is our relay: the stream's source is what counts."""
    sl.start_server("--tunnel-mode", "always")
    machine = sl.add_machine(start=False)
    with_unique_token(sl, machine, "before-reinstall")
    first = sl.wait_status(
        machine, lambda s: s.get("connected") and s.get("tunnel"), 30, "connected by tunnel"
    )
    attacker = sl.add_machine(start=False)
    steal = req(
        sl.join_token, machine.node_uuid,
        node_public_key=first["public_key"], node_unique_token="attackers-guess",
    )  # fmt: skip
    (result,) = provisions(attacker, api_target(sl), [steal])
    assert outcome(result) == "INVALID_ARGUMENT: node_public_key belongs to another machine"
    assert sl.ping(machine, first["server_address"])
    # The machine itself changes its unique token: from its own address, the key moves.
    config = machine.run_dir / "siderolink.yaml"
    config.write_text(config.read_text().replace("before-reinstall", "after-reinstall"))
    second = sl.wait_status(
        machine,
        lambda s: s.get("connected") and s.get("node_address") != first["node_address"],
        40,
        "connected as its new identity",
    )
    assert second["public_key"] == first["public_key"]
    (row,) = json.loads(gk(sl, "machines", "--json").stdout)
    assert row["address"] == second["node_address"].split("/")[0] and row["tunnel"] is True
    # Its new tunnel address is a new stream: the agent opens it by itself.
    deadline = time.monotonic() + 30
    while not sl.ping(machine, second["server_address"]):
        assert time.monotonic() < deadline, sl.tail(machine.log)
