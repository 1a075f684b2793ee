"""What the fleet commands print is safe on a terminal: strings a machine chose (its UUID in
a registry from before UUIDs were checked, its version, its log lines) come out escaped."""

from __future__ import annotations

import ipaddress
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from gatekeeper.server.fleet import logs_dir
from gatekeeper.server.journal import Journal
from gatekeeper.server.registry import InstanceRecord, MachineRecord, machine_key
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


def test_instances_print_what_another_writer_put_in_the_store_escaped(tmp_path: Path) -> None:
    # Names are checked where a server starts, but a shared store can hold rows written by
    # anyone who reaches it (or another version): listing them must not drive the terminal.
    state = tmp_path / "state"
    now = time.time()
    with SqliteRegistry(state) as reg:
        reg.heartbeat(
            InstanceRecord(HOSTILE, ("[2001:db8::1]:51820",), f"{HOSTILE}:1:2:3", now - 60, now),
            take_over=False,
        )
        # Ages well inside one unit of the table (2m shows from 90 to 149 s), so the time the
        # test and the CLI take does not change the text.
        reg.heartbeat(
            InstanceRecord("srv-b", ("[2001:db8::2]:51820",), "hostb:1:2:3", now - 60, now - 120),
            take_over=False,
        )
        # Times no clock gives (PostgreSQL also stores NaN; SQLite makes that NULL).
        reg.heartbeat(
            InstanceRecord("srv-c", (), "hostc:1:2:3", math.inf, math.inf), take_over=False
        )
        for n, owner in ((5, HOSTILE), (6, "srv-b"), (7, "gone")):
            reg.claim(
                MachineRecord(
                    machine_key=machine_key(f"uuid-{n}", None),
                    node_uuid=f"uuid-{n}",
                    address=ipaddress.IPv6Address(f"fdae:41e4:649b:9303::{n}"),
                    public_key=f"pk{n}",
                    owner=owner,
                )
            )
    done = gk("instances", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\r" not in done.stdout and "\u202e" not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "STATE", "HEARTBEAT", "MACHINES", "STARTED", "HOST", "ENDPOINTS"
    ]  # fmt: skip
    # header, three instances, the machine nobody holds
    assert len(lines) == 5, done.stdout
    # One line each however hostile the name; the name's own text stays visible, escaped.
    assert lines[1].startswith("evil\\x1b[2J") and "forged line" in lines[1]
    assert re.search(r"\blive\s+\d+s ago\s+1\s+1m ago\s", lines[1]), lines[1]
    assert lines[2].split()[:5] == ["srv-b", "stale", "2m", "ago", "1"]
    # A row with no usable times says so instead of "0s ago" (the store counts it as live,
    # and so does the list).
    assert lines[3].split()[:5] == ["srv-c", "live", "?", "0", "?"]
    assert lines[4] == (
        "machines held by no listed instance: 1 (a live instance takes them over once it has "
        "written its heartbeat for 15 s)"
    )
    done = gk("instances", "--json", "--state-dir", str(state))
    listed = json.loads(done.stdout)  # strict JSON: no NaN
    assert "NaN" not in done.stdout
    assert [(i["name"], i["live"], i["machines"]) for i in listed["instances"]] == [
        (HOSTILE, True, 1),
        ("srv-b", False, 1),
        ("srv-c", True, 0),
    ]
    assert listed["instances"][2]["heartbeat_age_s"] is None
    assert listed["instances"][2]["started"] is None
    assert listed["machines_without_instance"] == 1
