"""Operator mistakes around the server's WireGuard interface: a second server on the same
interface in the same namespace refuses to start (the first keeps its device and machines),
and a running server whose device vanishes says so and recreates it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from gatekeeper.lab.siderolink_lab import SideroLinkLab, gatekeeper_argv

pytestmark = pytest.mark.netns


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def link_index(sl: SideroLinkLab) -> str | None:
    out = sl.server_ns.run(["cat", f"/sys/class/net/{sl.server_wg_interface}/ifindex"], check=False)
    return out.strip() or None


def test_second_server_refuses_the_interface_and_a_vanished_device_comes_back(
    sl: SideroLinkLab,
) -> None:
    sl.start_server()
    m = sl.add_machine()
    status = sl.wait_connected(m)
    index = link_index(sl)
    assert index is not None and sl.server_proc is not None

    second_log = sl.workdir / "second.log"
    second = sl.lab.spawn(
        sl.server_ns,
        gatekeeper_argv(
            "server", "--state-dir", str(sl.workdir / "other-state"),
            "--listen", f"[{sl.server_underlay}]:8095",
            "--wireguard-interface", sl.server_wg_interface, "--wireguard-port", "51830",
            "--endpoint", f"[{sl.server_underlay}]:51830", "--join-token", "x",
            "--events-port", "0", "--logs-port", "0", "--no-isolation",
        ),
        log=second_log,
    )  # fmt: skip
    assert second.wait(timeout=30) == 1
    text = second_log.read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("gatekeeper server:")]
    assert f"interface {sl.server_wg_interface} belongs to a running gatekeeper server" in line
    assert f"(pid {sl.server_proc.pid})" in line
    assert "Traceback" not in text and "removing interface" not in text
    # The first server noticed nothing: same link, same peer, the machine still talks to it.
    assert link_index(sl) == index and status["public_key"] in sl.server_peers()
    assert sl.ping(m, status["server_address"])

    # Someone deletes the device under the running server.
    sl.server_ns.run(["ip", "link", "del", sl.server_wg_interface])
    deadline = time.monotonic() + 20
    while "recreated" not in sl.server_log.read_text():
        assert time.monotonic() < deadline, sl.tail(sl.server_log)
        time.sleep(0.2)
    log = sl.server_log.read_text()
    assert f"WireGuard interface {sl.server_wg_interface} is gone" in log
    assert link_index(sl) not in (None, index)
    assert status["public_key"] in sl.server_peers()
    # The machine's link comes back over the new device (its keepalive re-handshakes).
    deadline = time.monotonic() + 40
    while not sl.ping(m, status["server_address"]):
        assert time.monotonic() < deadline, "the machine did not come back"
    assert sl.server_proc.poll() is None
    done = subprocess.run(
        ["wg", "show", sl.server_wg_interface, "listen-port"],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    assert done.stdout.strip() == "51820"
