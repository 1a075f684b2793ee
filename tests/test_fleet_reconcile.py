"""The server's WireGuard device follows its registry (peer_reconciler.py): a machine removed
from the store by a `gatekeeper machines remove` that cannot reach the server's admin socket
(another host, another state directory) still loses its peer, within 2 s. Real server, real
wireguard-go, real agent in a namespace, the CLI as a separate process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatekeeper.lab.siderolink_lab import SideroLinkLab

pytestmark = pytest.mark.netns


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def gone_within(sl: SideroLinkLab, key: str, seconds: float) -> float | None:
    """Seconds until `key` left the server's device (`wg show`), None if it stayed."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if key not in sl.server_peers():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_a_removal_without_the_admin_socket_reaches_the_device(
    sl: SideroLinkLab, tmp_path: Path
) -> None:
    sl.start_server()
    m = sl.add_machine()
    status = sl.wait_connected(m)
    assert status["public_key"] in sl.server_peers()
    elsewhere = tmp_path / "elsewhere"  # no server runs here: no admin socket to ask
    elsewhere.mkdir()
    registry = f"sqlite://{sl.state_dir / 'registry.sqlite3'}"
    done = subprocess.run(
        [
            sys.executable, "-m", "gatekeeper", "machines", "remove", m.node_uuid,
            "--registry", registry, "--state-dir", str(elsewhere),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    took = gone_within(sl, status["public_key"], 2.0)
    assert took is not None, (
        f"the removed machine's peer is still on the server's device\n{sl.tail(sl.server_log)}"
    )
    # The server keeps serving: the machine may join again and gets its peer back.
    sl.stop_agent(m)
    sl.start_agent(m)
    again = sl.wait_connected(m)
    assert again["public_key"] in sl.server_peers()
