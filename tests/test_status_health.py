"""`gatekeeper status` on a machine: the health block, checked against a real link, server,
firewall and telemetry sinks; `--watch`; the exit status once the server is gone.

The command runs in the agent's network and mount namespaces (nsenter): the lab gives every
agent a private /run/wireguard (all namespaces share that directory, and every lab machine
names its link `siderolink`), and wireguard-go's control socket is only visible there, as it
is to an operator on a real machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gatekeeper.lab.siderolink_lab import WG_PORT, Machine, SideroLinkLab

pytestmark = pytest.mark.netns

SERVER = "fdae:41e4:649b:9303::1"
SINKS = f" talos.events.sink=[{SERVER}]:8090 talos.logging.kernel=tcp://[{SERVER}]:8092"


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def status_argv(m: Machine, *args: str) -> list[str]:
    assert m.proc is not None
    return [
        "nsenter", "-t", str(m.proc.pid), "-m", "-n",
        sys.executable, "-m", "gatekeeper", "status",
        "--run-dir", str(m.run_dir), "--cmdline", str(m.cmdline), *args,
    ]  # fmt: skip


def status(m: Machine, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(status_argv(m, *args), capture_output=True, text=True, timeout=60)


def health_rows(text: str) -> dict[str, str]:
    block = text.split("\n\n")[0].splitlines()
    assert block[0] == "HEALTH"
    rows: dict[str, str] = {}
    last = ""
    for line in block[1:]:
        key, value = line[2:18].strip(), line[18:].strip()
        last = key or last
        rows[last] = f"{rows[last]}\n{value}" if not key else value
    return rows


def test_health_block_watch_and_exit_status(sl: SideroLinkLab) -> None:
    sl.start_server()
    m = sl.add_machine(start=False)
    m.cmdline.write_text(m.cmdline.read_text().strip() + SINKS + "\n")
    sl.start_agent(m, "--link-timeout", "3")
    doc = sl.wait_connected(m)
    node = doc["node_address"].split("/")[0]
    endpoint = f"[{sl.server_underlay}]:{WG_PORT}"
    time.sleep(0.5)  # a first tx/rx beyond the handshake

    done = status(m)
    assert done.returncode == 0, done.stderr
    rows = health_rows(done.stdout)
    assert rows["link"].startswith("up, siderolink, backend userspace")
    assert rows["path"] == f"via UDP {endpoint}: direct WireGuard over UDP"
    assert rows["handshake"].endswith("s ago (device)")
    assert rows["traffic"].startswith("rx ") and ", tx " in rows["traffic"]
    assert rows["traffic"].endswith("(device)")
    assert rows["rtt"].endswith(" ms")
    assert rows["firewall"].startswith("table inet gatekeeper, ingress policy accept, ")
    assert rows["maintenance"] == f"listening on [{node}]:50000"
    assert rows["events sink"] == f"[{SERVER}]:8090 reachable"
    assert rows["kernel logs"] == f"tcp://[{SERVER}]:8092 reachable"
    assert (
        rows["path changes"]
        .splitlines()[-1]
        .endswith(f"UDP {endpoint} (direct WireGuard over UDP)")
    )
    assert "\nSTATE " in done.stdout and "jointoken=<redacted>" in done.stdout
    assert sl.join_token not in done.stdout

    as_json = json.loads(status(m, "--json").stdout)
    assert as_json["connected"] is True
    assert as_json["health"]["maintenance"] == rows["maintenance"]
    assert as_json["path_history"][-1]["endpoint"] == endpoint

    # --watch --json: one document per interval, until interrupted.
    watch = subprocess.Popen(
        status_argv(m, "--watch", "--json", "--interval", "0.5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
    finally:
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=20)
    assert watch.returncode == 0, err
    updates = [json.loads(line) for line in out.splitlines()]
    assert len(updates) >= 2 and all(u["health"]["link"].startswith("up,") for u in updates)

    sl.stop_server()
    sl.wait_status(m, lambda s: not s.get("connected"), 30, "disconnected")
    down = status(m)
    assert down.returncode == 3
    rows = health_rows(down.stdout)
    assert rows["link"].startswith("down (")
    assert rows["rtt"] == "-"
    assert "not reachable" in rows["events sink"]
    assert rows["path changes"].splitlines()[-1].split(" ", 1)[1].startswith("down")


def test_no_agent_status_is_exit_1(sl: SideroLinkLab) -> None:
    nowhere = sl.workdir / "none"
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "status", "--run-dir", str(nowhere)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"gatekeeper status: no agent status at {nowhere}/status.json")
