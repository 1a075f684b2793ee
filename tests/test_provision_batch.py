"""Provisions that arrive together are answered together (server/batcher.py): one UAPI set and
one store commit per batch, and each caller still gets what it would have got alone. Real
server, real wireguard-go, real SQLite, the storm client in a namespace."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetlab import gk

from gatekeeper.lab.siderolink_lab import SideroLinkLab

pytestmark = pytest.mark.netns

STORM = Path(__file__).parent.parent / "bench" / "storm_client.py"


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
            f"--token={token}", "--out", str(out),
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
    # Batched: fewer commits than Provisions (the server logs each batch of more than one).
    sizes = [int(n) for n in re.findall(r"(\d+) Provisions answered as one batch", log(sl))]
    assert sizes and max(sizes) > 1, "no two Provisions shared a batch"
    print(f"{len(sizes)} batches of more than one, largest {max(sizes)}")


def log(sl: SideroLinkLab) -> str:
    return sl.server_log.read_text()
