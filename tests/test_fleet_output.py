"""What the fleet commands print is safe on a terminal: strings a machine chose (its UUID in
a registry from before UUIDs were checked, its version, its log lines) come out escaped."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

from gatekeeper.server.fleet import logs_dir
from gatekeeper.server.journal import Journal
from gatekeeper.server.registry import MachineRecord, machine_key
from gatekeeper.server.sqlite_registry import SqliteRegistry

GATEKEEPER = [sys.executable, "-m", "gatekeeper"]
HOSTILE = "evil\x1b[2J\x1b]0;owned\x07\nforged line\r\u202e"


def gk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEKEEPER, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_machines_and_logs_print_client_strings_escaped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    record = MachineRecord(
        machine_key=machine_key(HOSTILE, None),
        node_uuid=HOSTILE,
        address=ipaddress.IPv6Address("fdae:41e4:649b:9303::5"),
        public_key="pk",
        talos_version="v1\x1b[31m\x00",
    )
    with SqliteRegistry(state) as reg:
        reg.claim(record)
    journal = Journal(logs_dir(state), max_bytes=1 << 20)
    journal.append(record.machine_key, [{"msg": "line\x1b[2Jwith\ncontrols", "facility": "x\r"}])
    journal.close()

    table = gk("machines", "--state-dir", str(state))
    assert table.returncode == 0, table.stderr
    for out in (table.stdout,):
        assert not any(c in out for c in "\x1b\x07\r\x00\u202e")
        assert "evil\\x1b[2J" in out and "\\nforged line" in out and "v1\\x1b[31m" in out
    # JSON carries the exact strings, escaped by JSON itself.
    (row,) = json.loads(gk("machines", "--json", "--state-dir", str(state)).stdout)
    assert row["uuid"] == HOSTILE

    logs = gk("logs", "evil", "--state-dir", str(state))
    assert logs.returncode == 1 and "no machine with UUID 'evil'" in logs.stderr
    logs = gk("logs", HOSTILE, "--state-dir", str(state))
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.count("\n") == 1 and "\x1b" not in logs.stdout
    assert "line\\x1b[2Jwith\\ncontrols" in logs.stdout and "x\\r." in logs.stdout
