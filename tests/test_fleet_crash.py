"""Crash safety: SIGKILL the server in the middle of a storm of provisions, start it again.

Every provision the server answered must be in the registry (same address, same key), the
restarted server must hold their peers, and the registry must pass SQLite's integrity check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from fleetlab import STORM

from gatekeeper.lab.siderolink_lab import SideroLinkLab
from gatekeeper.server.sqlite_registry import SqliteRegistry

pytestmark = pytest.mark.netns


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def test_sigkill_mid_storm_loses_no_answered_provision(sl: SideroLinkLab) -> None:
    sl.start_server()
    m = sl.add_machine(start=False)
    answered = sl.workdir / "answered.jsonl"
    client = sl.lab.spawn(
        m.ns,
        [
            sys.executable, str(STORM), f"[{sl.server_underlay}]:8090",
            "--count", "3000", "--concurrency", "64", "--channels", "4",
            f"--token-file={sl.token_file()}", "--out", str(answered),
        ],
        log=sl.workdir / "storm.log",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if answered.exists() and answered.read_text().count("\n") >= 200:
            break
        assert client.poll() is None, sl.tail(sl.workdir / "storm.log")
        time.sleep(0.01)
    else:
        raise AssertionError("the storm did not get going")
    sl.stop_server(kill=True)
    sl.lab.stop(client)
    lines = [json.loads(x) for x in answered.read_text().splitlines() if x.endswith("}")]
    assert 200 <= len(lines) < 3000, "the kill should land mid-storm"

    registry = SqliteRegistry(sl.state_dir)
    try:
        assert registry.integrity_check() == "ok"
        by_uuid = {r.node_uuid: r for r in registry.machines()}
    finally:
        registry.close()
    missing = [x for x in lines if x["uuid"] not in by_uuid]
    assert not missing, f"{len(missing)} answered provisions lost"
    for x in lines:
        record = by_uuid[x["uuid"]]
        assert str(record.address) == x["address"] and record.public_key == x["key"]

    sl.start_server()
    peers = set(sl.server_peers())
    assert {x["key"] for x in lines} <= peers
    argv = ["machines", "--json", "--state-dir", str(sl.state_dir)]
    out = subprocess.run(
        [sys.executable, "-m", "gatekeeper", *argv],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert len(json.loads(out)) == len(by_uuid)
