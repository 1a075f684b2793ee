"""Retention of machine logs and events: the journal's size and age limits on real files, and
a real server with --logs-max-bytes-per-machine and --logs-max-age receiving a real agent's
kernel log; `gatekeeper logs --since`."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetlab import gk

from gatekeeper.lab.siderolink_lab import SideroLinkLab
from gatekeeper.server.audit import rfc3339
from gatekeeper.server.fleet import logs_dir
from gatekeeper.server.journal import Journal, entry_time, read_journal

SERVER = "fdae:41e4:649b:9303::1"


def entry(at: float, n: int) -> dict[str, Any]:
    return {"received": rfc3339(at), "msg": f"line {n}"}


def test_sweep_keeps_young_entries_and_drops_old_files(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1 << 20, max_age=100)
    t0 = 1_000_000.0
    journal.append("m", [entry(t0, 1)])
    journal.append("m", [entry(t0 + 40, 2)])
    current = journal.path("m")
    os.utime(current, (t0 + 40, t0 + 40))

    assert journal.sweep(now=t0 + 45) == 0  # oldest 45 s: under half the age, untouched
    assert [e["msg"] for e in read_journal(current)] == ["line 1", "line 2"]
    assert journal.sweep(now=t0 + 60) == 0  # oldest 60 s: rotated, nothing lost
    rotated = current.with_name("m.jsonl.1")
    assert rotated.exists() and not current.exists()
    journal.append("m", [entry(t0 + 61, 3)])
    assert [e["msg"] for e in read_journal(current)] == ["line 1", "line 2", "line 3"]
    assert journal.sweep(now=t0 + 139) == 0  # newest rotated entry 99 s old: kept
    assert journal.sweep(now=t0 + 141) == 1  # now older than the age: the file goes
    assert [e["msg"] for e in read_journal(current)] == ["line 3"]
    journal.close()


def test_size_limit_rotates_at_half(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1000)
    for n in range(100):
        journal.append("m", [entry(1_000_000.0 + n, n)])
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert len(sizes) == 2 and all(size < 1100 for size in sizes)
    kept = [e["msg"] for e in read_journal(journal.path("m"))]
    assert kept[-1] == "line 99" and "line 0" not in kept
    journal.close()


def test_entry_time_reads_both_kinds() -> None:
    assert entry_time({"received": "2026-12-02T06:00:00.000Z"}) == 1796191200.0
    assert entry_time({"time": "2026-12-02T06:00:00.000Z"}) == 1796191200.0
    assert entry_time({"time": "yesterday"}) is None and entry_time({}) is None


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


@pytest.mark.netns
def test_server_keeps_logs_within_limits_and_logs_since_filters(sl: SideroLinkLab) -> None:
    age = 4.0
    sl.start_server("--logs-max-bytes-per-machine", "64K", "--logs-max-age", f"{age:g}s")
    m = sl.add_machine(start=False)
    m.cmdline.write_text(
        m.cmdline.read_text().strip() + f" talos.logging.kernel=tcp://[{SERVER}]:8092\n"
    )
    sl.start_agent(m)
    sl.wait_connected(m)

    def stored() -> list[dict[str, Any]]:
        out = gk(sl, "logs", m.node_uuid, "--json").stdout
        return [json.loads(line) for line in out.splitlines()]

    deadline = time.monotonic() + 20
    while not stored() and time.monotonic() < deadline:
        time.sleep(0.2)
    first = stored()
    assert first, "no kernel log line arrived"
    # The kernel's backlog (thousands of lines) does not fit in 64K: rotated at 32K, the
    # oldest half gone. One append (a 64 KiB read of lines, as entries) may overshoot.
    files = sorted(logs_dir(sl.state_dir).glob("*.jsonl*"))
    assert "jsonl.1" in [f.name.split(".", 1)[1] for f in files]  # rotated at least once
    assert all(f.stat().st_size <= 32 * 1024 + 200 * 1024 for f in files)

    time.sleep(2 * age + 2)  # past the age, its doubling, and a sweep
    marker = f"gatekeeper-retention-{secrets.token_hex(4)}"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"<6>{marker}\n")
    deadline = time.monotonic() + 20
    while not any(marker in e.get("msg", "") for e in stored()):
        assert time.monotonic() < deadline, "the marker line did not arrive"
        time.sleep(0.2)
    now = time.time()
    kept = stored()
    assert all(now - (entry_time(e) or 0) < 2 * age + 1.5 for e in kept)
    backlog_seqs = {e["seq"] for e in first}
    assert not backlog_seqs & {e["seq"] for e in kept}

    assert marker in gk(sl, "logs", m.node_uuid, "--since", "60s").stdout
    time.sleep(2)
    assert marker not in gk(sl, "logs", m.node_uuid, "--since", "1s").stdout
    bad = gk(sl, "logs", m.node_uuid, "--since", "soon", check=False)
    assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr
