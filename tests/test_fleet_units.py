"""Fleet pieces without a network: telemetry parsing, journals, log lines, isolation rules."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.agent.telemetry import Sinks, parse_kmsg, sinks_from_cmdline, status_event
from gatekeeper.overlay import overlay_prefix
from gatekeeper.server.attribution import grpc_peer_address
from gatekeeper.server.events import event_entry
from gatekeeper.server.isolation import isolation_commands
from gatekeeper.server.journal import Journal, read_journal
from gatekeeper.server.logreceiver import log_entry
from gatekeeper.server.registry import MachineRecord


def test_sinks_from_the_kernel_command_line() -> None:
    sinks, problems = sinks_from_cmdline(
        "console=ttyS0 talos.events.sink=[fdae:41e4:649b:9303::1]:8090 "
        "talos.logging.kernel=tcp://[fdae:41e4:649b:9303::1]:8092 "
        "talos.events.sink=ignored:1"
    )
    assert sinks == Sinks("[fdae:41e4:649b:9303::1]:8090", ("fdae:41e4:649b:9303::1", 8092))
    assert problems == []
    sinks, problems = sinks_from_cmdline(
        "talos.events.sink=nowhere talos.logging.kernel=udp://[fd00::1]:5"
    )
    assert sinks == Sinks()
    assert problems == [
        "talos.events.sink: value 'nowhere' is not host:port: missing port",
        "talos.logging.kernel: scheme 'udp' is not supported, use tcp://",
    ]
    assert sinks_from_cmdline("quiet") == (Sinks(), [])


def test_kmsg_records_become_talos_log_lines() -> None:
    line = parse_kmsg(b"4,1234,5000000,-;eth0: link up\n SUBSYSTEM=net\n", boot_time=1.7e9)
    assert line == {
        "msg": "eth0: link up",
        "talos-time": "2023-11-14T22:13:25.000000000Z",
        "talos-level": "warning",
        "facility": "kern",
        "seq": 1234,
        "clock": 5000000,
        "priority": "warning",
    }
    assert parse_kmsg(b"no header", 0.0) is None
    assert parse_kmsg(b"x,y,z;text", 0.0) is None


@given(st.binary(max_size=200))
def test_kmsg_parser_never_crashes(record: bytes) -> None:
    parse_kmsg(record, 0.0)


def test_status_events_carry_no_secret() -> None:
    event = status_event({"state": "up", "connected": True, "join_token": "secret"})
    assert event.data.type_url.endswith("google.protobuf.Struct") and event.id
    assert b"secret" not in event.SerializeToString()


def _machine() -> MachineRecord:
    return MachineRecord("k" * 64, "uuid-1", ipaddress.IPv6Address("fdae::5"), "pk")


def test_log_and_event_entries() -> None:
    entry = log_entry(b'{"msg": "hi", "talos-level": "info", "machine": "spoofed"}', _machine(), 0)
    assert entry["machine"] == "uuid-1" and entry["msg"] == "hi"
    assert log_entry(b"plain text", _machine(), 0)["malformed"] is True
    event = event_entry(status_event({"state": "up"}), "uuid-1", "fdae::5")
    assert event["data"]["state"] == "up" and event["machine"] == "uuid-1"


def test_peer_addresses_as_grpc_writes_them() -> None:
    assert grpc_peer_address("ipv6:%5Bfdae::5%5D:4000") == ipaddress.IPv6Address("fdae::5")
    assert grpc_peer_address("ipv6:[fdae::5]:4000") == ipaddress.IPv6Address("fdae::5")
    assert grpc_peer_address("ipv4:10.0.0.1:5") is None
    assert grpc_peer_address("unix:/x") is None


def test_journal_is_bounded_and_followable(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1000)
    for i in range(200):
        journal.append("m", [{"n": i, "pad": "x" * 20}])
    journal.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["m.jsonl", "m.jsonl.1"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 2100
    got = [e["n"] for e in read_journal(tmp_path / "m.jsonl")]
    assert got == list(range(got[0], 200))  # newest kept, in order, none skipped


def test_isolation_rules_name_the_prefix_and_the_link() -> None:
    text = json.dumps(isolation_commands(overlay_prefix(""), "siderolink"))
    assert '"addr": "fdae:41e4:649b:9303::", "len": 64' in text
    assert '"set": ["lo", "siderolink"]' in text and '"hook": "forward"' in text
