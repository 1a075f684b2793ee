"""Events and kernel logs over the overlay: a real agent sends them (talos.events.sink= and
talos.logging.kernel= on its command line), the server stores them attributed to the machine,
`gatekeeper logs` / `gatekeeper events` print them; senders from off the overlay are refused."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fleetlab import gk, scrape

from gatekeeper.lab.siderolink_lab import SideroLinkLab

pytestmark = pytest.mark.netns

SERVER = "fdae:41e4:649b:9303::1"
METRICS_PORT = 9108


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def eventually(what: str, check: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


_OUTSIDER = """
import json, socket, sys, grpc
from gatekeeper.pb.events import events_pb2, events_pb2_grpc
out = {}
with grpc.insecure_channel(sys.argv[1]) as ch:
    try:
        events_pb2_grpc.EventSinkServiceStub(ch).Publish(events_pb2.EventRequest(id="x"), timeout=5)
        out["publish"] = "OK"
    except grpc.RpcError as e:
        out["publish"] = e.code().name
s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
try:
    s.sendall(b'{"msg": "from outside"}\\n')
    out["log"] = "answered" if s.recv(10) else "closed"
except (ConnectionResetError, BrokenPipeError):
    out["log"] = "closed"
print(json.dumps(out))
"""


def test_events_and_kernel_logs_arrive_attributed(sl: SideroLinkLab) -> None:
    sl.start_server("--metrics-listen", f"[{sl.server_underlay}]:{METRICS_PORT}")
    m = sl.add_machine(start=False)
    m.cmdline.write_text(
        m.cmdline.read_text().strip()
        + f" talos.events.sink=[{SERVER}]:8090 talos.logging.kernel=tcp://[{SERVER}]:8092\n"
    )
    sl.start_agent(m)
    sl.wait_connected(m)

    def status_events() -> list[dict[str, Any]]:
        out = gk(sl, "events", "--json", "--machine", m.node_uuid).stdout
        return [e for e in map(json.loads, out.splitlines()) if e.get("data", {}).get("connected")]

    (event, *_) = eventually("a connected status event", status_events)
    assert event["machine"] == m.node_uuid and event["type"].endswith("google.protobuf.Struct")
    assert event["data"]["state"] == "up" and event["data"]["link_name"] == "siderolink"
    assert "connected" in gk(sl, "events").stdout

    marker = f"gatekeeper-fleet-test-{secrets.token_hex(4)}"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"<4>{marker}\n")

    def logged() -> list[dict[str, Any]]:
        out = gk(sl, "logs", m.node_uuid, "--json").stdout
        return [e for e in map(json.loads, out.splitlines()) if marker in e.get("msg", "")]

    (line,) = eventually("the kernel line in the machine's logs", logged)
    assert line["machine"] == m.node_uuid and line["talos-level"] == "warning"
    assert line["facility"] == "user" and isinstance(line["seq"], int)
    assert line["talos-time"].endswith("Z") and len(line["talos-time"].split(".")[1]) == 10
    assert marker in gk(sl, "logs", m.node_uuid).stdout

    # --follow prints lines that arrive later.
    follow = subprocess.Popen(
        [sys.executable, "-m", "gatekeeper", "logs", m.node_uuid, "--follow",
         "--state-dir", str(sl.state_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(follow.stdout or []), daemon=True)
    reader.start()
    try:
        eventually("the earlier line, followed", lambda: any(marker in x for x in seen))
        later = marker + "-later"
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"<6>{later}\n")
        eventually("the later line, followed", lambda: any(later in x for x in seen))
    finally:
        follow.terminate()
        follow.wait(5)

    # A sender that is not a machine on the overlay: the machine namespace of another host,
    # routing the server's overlay address over the underlay.
    outsider = sl.add_machine(start=False)
    outsider.ns.run(["ip", "-6", "route", "add", f"{SERVER}/128", "via", sl.server_underlay])
    done = subprocess.run(
        outsider.ns.exec_argv(
            [sys.executable, "-c", _OUTSIDER, f"[{SERVER}]:8090", SERVER, "8092"]
        ),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"publish": "PERMISSION_DENIED", "log": "closed"}
    assert "from outside" not in gk(sl, "logs", m.node_uuid).stdout

    metrics = scrape(sl, METRICS_PORT)
    assert 'gatekeeper_provisions_total{outcome="ok"} 1.0' in metrics
    assert "gatekeeper_machines_registered 1.0" in metrics
    assert "gatekeeper_machines_connected 1.0" in metrics
    assert 'gatekeeper_telemetry_refused_total{kind="events"} 1.0' in metrics
    assert 'gatekeeper_telemetry_refused_total{kind="logs"} 1.0' in metrics
    assert "gatekeeper_log_lines_received_total" in metrics
    assert "gatekeeper_telemetry_dropped_total 0.0" in metrics
