"""`gatekeeper machines`: traffic, remote address, join token, provisions, offline since and
warnings, the filters and --watch, against a real server with real machines."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetlab import api_target, gk, provisions

from gatekeeper.lab.siderolink_lab import SideroLinkLab
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.wireguard.keys import PrivateKey

pytestmark = pytest.mark.netns


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def listed(sl: SideroLinkLab, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(gk(sl, "machines", "--json", *args).stdout)
    return rows


def test_machines_view_columns_filters_and_watch(sl: SideroLinkLab) -> None:
    sl.start_server()
    token = gk(sl, "token", "create", "--name", "rack-4", "--expires-in", "2d").stdout.strip()
    token_id = token.split(".")[0]
    a = sl.add_machine(api_url=f"grpc://[{sl.server_underlay}]:8090?jointoken={token}")
    b = sl.add_machine(api_url=sl.api_url(grpc_tunnel="true"))
    sl.wait_connected(a)
    sl.wait_status(b, lambda s: s.get("connected") and s.get("tunnel"), 30, "on the tunnel")
    # A second identity under a's UUID (another unique token) that never brings up a link.
    (reply,) = provisions(
        a,
        api_target(sl),
        [
            {
                "node_uuid": a.node_uuid,
                "node_public_key": PrivateKey.generate().public_key().base64(),
                "join_token": sl.join_token,
                "node_unique_token": "another-disk",
            }
        ],
    )
    assert "ok" in reply
    time.sleep(1)  # traffic beyond the handshakes

    rows = listed(sl)
    by_uuid: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_uuid.setdefault(row["uuid"], []).append(row)
    live_a = next(r for r in by_uuid[a.node_uuid] if r["connected"])
    ghost = next(r for r in by_uuid[a.node_uuid] if not r["connected"])
    (row_b,) = by_uuid[b.node_uuid]

    assert live_a["join_token"] == {"id": token_id, "name": "rack-4"}
    assert live_a["provisions"] == 1 and live_a["offline_since"] is None
    assert live_a["remote_address"].startswith(f"[{a.underlay}]:")
    assert live_a["rx_bytes"] > 0 and live_a["tx_bytes"] > 0
    assert live_a["warnings"] == ["join token expires in 2d", "duplicate UUID"]
    assert row_b["join_token"] is None and row_b["warnings"] == ["using the tunnel"]
    assert ghost["connected"] is False and ghost["offline_since"]
    assert ghost["warnings"] == ["no endpoint", "duplicate UUID"]

    assert [r["uuid"] for r in listed(sl, "--tunnel")] == [b.node_uuid]
    assert [r["provisions"] for r in listed(sl, "--token", token_id)] == [1]
    assert {r["public_key"] for r in listed(sl, "--connected")} == {
        live_a["public_key"],
        row_b["public_key"],
    }
    assert [r["public_key"] for r in listed(sl, "--offline")] == [ghost["public_key"]]

    table = gk(sl, "machines").stdout
    header = table.splitlines()[0].split()
    assert header[-7:] == ["VERSION", "RX/TX", "REMOTE", "TOKEN", "PROV", "WARNINGS", "CONFLICT"]
    assert f"{token_id} (rack-4)" in table and "using the tunnel" in table

    # The machine restarts: a new key, a second Provision.
    sl.stop_agent(a)
    sl.start_agent(a)
    sl.wait_connected(a)
    (again,) = listed(sl, "--token", token_id)
    assert again["provisions"] == 2

    watch = subprocess.Popen(
        [sys.executable, "-m", "gatekeeper", "machines", "--json", "--watch",
         "--interval", "0.5", "--tunnel", "--state-dir", str(sl.state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3)
    finally:
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=20)
    assert watch.returncode == 0, err
    updates = [json.loads(line) for line in out.splitlines() if line]
    assert len(updates) >= 2 and all([r["uuid"] for r in u] == [b.node_uuid] for u in updates)

    sl.stop_server()
    refused = gk(sl, "machines", "--offline", check=False)
    assert refused.returncode == 1
    assert refused.stderr == (
        "gatekeeper machines: --connected and --offline need the running server (none found)\n"
    )
    both = gk(sl, "machines", "--offline", "--connected", check=False)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_ctrl_c_in_the_middle_of_a_watched_listing_ends_it_cleanly(tmp_path: Path) -> None:
    """A slow server (its admin socket answers only once the Ctrl-C was sent) holds the
    listing: the Ctrl-C lands inside it, and `--watch` ends with 0 after that listing."""
    SqliteRegistry(tmp_path).close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "admin.sock"))
    listener.listen()
    inside, sent = threading.Event(), threading.Event()

    def slow_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 << 16)
            inside.set()
            sent.wait(20)
            conn.sendall(json.dumps({"ok": True, "peers": []}).encode() + b"\n")

    server = threading.Thread(target=slow_server, daemon=True)
    server.start()
    try:
        watch = subprocess.Popen(
            [sys.executable, "-m", "gatekeeper", "machines", "--watch", "--interval", "0.1",
             "--state-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert inside.wait(20), "the listing never asked the server"
        watch.send_signal(signal.SIGINT)
        time.sleep(0.3)  # delivered while the listing waits
        sent.set()
        _, err = watch.communicate(timeout=30)
        assert watch.returncode == 0, err
    finally:
        sent.set()
        listener.close()
        server.join(5)
