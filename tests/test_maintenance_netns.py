"""The maintenance API in network namespaces: where it listens, who is admin, moves, Watch.

Three namespaces stand for the real places:

    server (fd00:10::1, overlay fdae:…::1) ── veth ── machine ── veth ── lan (fd00:20::2)
                                         (fd00:10::2, fd00:20::1, overlay fdae:…::7081)

The overlay addresses are plain local /128s (the WireGuard link itself is the lead's
end-to-end test); the server reaches it with its own overlay address as source, so it
is an admin, and the lan host reaches it from outside the prefix through the underlay, so
it is refused (readers exist only while the API listens on every address). The
machine runs the real MaintenanceService (tests/maint_standalone.py), driven
over stdin; the clients are the real CLI, run inside their namespaces.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.lab.netns import Lab, Namespace

pytestmark = pytest.mark.netns

PREFIX = "fdae:41e4:649b:9303::/64"
SERVER_OVERLAY = "fdae:41e4:649b:9303::1"
MACHINE_OVERLAY = "fdae:41e4:649b:9303::7081"
MACHINE_OVERLAY_2 = "fdae:41e4:649b:9303::9999"
MACHINE_VETH = "fd00:10::2"
PORT = 50000

TCP_PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        print("open")
    except ConnectionRefusedError:
        print("refused")
    except OSError as exc:
        print(type(exc).__name__)
"""


@dataclass
class Topology:
    lab: Lab
    server: Namespace
    machine: Namespace
    lan: Namespace


class Lines:
    """Lines from a child's stdout with a deadline (select on the fd, our own buffer: a
    buffered reader would swallow lines that select then never reports)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc, self.fd, self.buf = proc, proc.stdout.fileno(), b""

    def read(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"no output from the process within {timeout} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"process exited (code {self.proc.poll()})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode() + "\n"


class Machine:
    """The standalone maintenance process inside the machine namespace."""

    def __init__(self, topo: Topology) -> None:
        self.proc = subprocess.Popen(
            topo.machine.exec_argv(
                [
                    sys.executable,
                    str(Path(__file__).with_name("maint_standalone.py")),
                    "--prefix",
                    PREFIX,
                    "--port",
                    str(PORT),
                    "--uuid",
                    "4c4c4544-0042-3510-8054-b7c04f4e3332",
                ]
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        topo.lab.processes.append(self.proc)  # Lab stops it by PID, also on failure
        self.lines = Lines(self.proc)
        assert json.loads(self.lines.read(15))["ready"]

    def send(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.lines.read(10))
        assert reply["ok"], reply
        return reply


@pytest.fixture
def topo(lab: Lab) -> Iterator[Topology]:
    server, machine, lan = lab.namespace("srv"), lab.namespace("mach"), lab.namespace("lan")
    lab.veth(server, "fd00:10::1/64", machine, f"{MACHINE_VETH}/64")
    lab.veth(machine, "fd00:20::1/64", lan, "fd00:20::2/64", a_if="eth1")
    # This kernel has no dummy links, and an address on lo would be used as a neighbour-
    # discovery source that the peer cannot answer: the overlay /128s sit on the veths.
    for ns, addr in ((server, SERVER_OVERLAY), (machine, MACHINE_OVERLAY)):
        ns.run(["ip", "addr", "add", f"{addr}/128", "dev", "eth0", "nodad"])
    server.run(["ip", "route", "add", PREFIX, "via", MACHINE_VETH, "src", SERVER_OVERLAY])
    machine.run(["ip", "route", "add", f"{SERVER_OVERLAY}/128", "via", "fd00:10::1"])
    lan.run(["ip", "route", "add", PREFIX, "via", "fd00:20::1"])
    yield Topology(lab, server, machine, lan)


def tcp(ns: Namespace, *targets: str) -> list[str]:
    out = ns.run([sys.executable, "-c", TCP_PROBE, *targets], timeout=20)
    return out.split()


def cli(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns.exec_argv([sys.executable, "-m", "gatekeeper", "maint", *args]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def at(addr: str) -> str:
    return f"[{addr}]:{PORT}"


def test_listens_only_on_the_siderolink_address_and_moves_with_it(topo: Topology) -> None:
    machine = Machine(topo)
    machine.send(
        op="config",
        api_endpoint="https://sl.example/?jointoken=s3cret",
        host="sl.example:443",
        join_token="s3cret",
    )
    machine.send(op="status", host="sl.example:443", connected=True)

    # SideroLink configured, no address yet: nothing listens anywhere.
    assert machine.send(op="apply", target="none")["bound"] is None
    assert tcp(topo.server, at(MACHINE_OVERLAY), at(MACHINE_VETH)) == ["refused"] * 2
    assert tcp(topo.machine, f"127.0.0.1:{PORT}", at("::1"), at(MACHINE_VETH)) == ["refused"] * 3

    # The address exists: only [overlay]:50000 answers.
    assert machine.send(op="apply", target=MACHINE_OVERLAY)["bound"] == at(MACHINE_OVERLAY)
    assert tcp(topo.server, at(MACHINE_VETH)) == ["refused"]
    assert tcp(topo.machine, f"127.0.0.1:{PORT}", at("::1"), at(MACHINE_VETH)) == ["refused"] * 3
    version = cli(topo.server, "version", "-n", MACHINE_OVERLAY)
    assert version.returncode == 0, version.stderr
    assert "Tag:         v0.1.0" in version.stdout

    # Admin over the overlay reads the sensitive config whole, as Talos's SideroLink peers do.
    config = cli(topo.server, "get", "siderolinkconfig", "-n", MACHINE_OVERLAY, "-o", "yaml")
    assert config.returncode == 0, config.stderr
    assert "apiEndpoint: https://sl.example/?jointoken=s3cret" in config.stdout

    # The LAN host routes to the overlay address through the underlay (no firewall here):
    # bound to the overlay address, the API serves nobody from outside the overlay.
    for what in (("version",), ("get", "siderolinkstatus"), ("get", "siderolinkconfig")):
        denied = cli(topo.lan, *what, "-n", MACHINE_OVERLAY)
        assert denied.returncode == 1
        assert "PERMISSION_DENIED: the maintenance API answers only over SideroLink" in (
            denied.stderr
        ), denied.stderr

    # Re-provisioned with a new address: the listener moves, same process, same port.
    topo.machine.run(["ip", "addr", "add", f"{MACHINE_OVERLAY_2}/128", "dev", "eth0", "nodad"])
    assert machine.send(op="apply", target=MACHINE_OVERLAY_2)["bound"] == at(MACHINE_OVERLAY_2)
    assert tcp(topo.server, at(MACHINE_OVERLAY), at(MACHINE_OVERLAY_2)) == ["refused", "open"]
    moved = cli(topo.server, "get", "ss", "-n", MACHINE_OVERLAY_2, "-o", "json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["spec"]["connected"] is True
    assert machine.proc.poll() is None


def _json_docs(lines: Lines, count: int, timeout: float) -> list[dict[str, Any]]:
    """`count` JSON documents from the CLI's --watch -o json output (one per event)."""
    docs: list[dict[str, Any]] = []
    buf, deadline = "", time.monotonic() + timeout
    while len(docs) < count:
        buf += lines.read(max(0.1, deadline - time.monotonic()))
        if buf.startswith("}") or buf.endswith("\n}\n"):
            docs.append(json.loads(buf))
            buf = ""
    return docs


def test_watch_over_the_overlay_sees_the_link_go_down_and_up(topo: Topology) -> None:
    machine = Machine(topo)
    machine.send(op="status", host="sl.example:443", connected=True, link="siderolink")
    machine.send(op="apply", target=MACHINE_OVERLAY)
    watch = subprocess.Popen(
        topo.server.exec_argv(
            [
                sys.executable,
                "-m",
                "gatekeeper",
                "maint",
                "get",
                "ss",
                "-n",
                MACHINE_OVERLAY,
                "--watch",
                "-o",
                "json",
            ]
        ),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    topo.lab.processes.append(watch)
    lines = Lines(watch)
    try:
        (first,) = _json_docs(lines, 1, 15)
        assert (first["event"], first["spec"]["connected"]) == ("created", True)
        machine.send(op="status", host="sl.example:443", connected=False, link="siderolink")
        machine.send(op="status", host="sl.example:443", connected=True, link="siderolink")
        down, up = _json_docs(lines, 2, 10)
        assert (down["event"], down["spec"]["connected"], down["metadata"]["version"]) == (
            "updated",
            False,
            2,
        )
        assert (up["event"], up["spec"]["connected"], up["metadata"]["version"]) == (
            "updated",
            True,
            3,
        )
    finally:
        os.killpg(watch.pid, signal.SIGTERM)
        watch.wait(5)


def test_without_siderolink_it_listens_everywhere_as_maintenance_mode(topo: Topology) -> None:
    machine = Machine(topo)
    machine.send(op="prefix", prefix=None)
    assert machine.send(op="apply", target="all")["bound"] == f"[::]:{PORT}"
    assert tcp(topo.server, at(MACHINE_VETH)) == ["open"]
    assert tcp(topo.machine, f"127.0.0.1:{PORT}", at("::1")) == ["open", "open"]
    # Configuring SideroLink afterwards: the wildcard goes away before the overlay listener.
    machine.send(op="prefix", prefix=PREFIX)
    assert machine.send(op="apply", target=MACHINE_OVERLAY)["bound"] == at(MACHINE_OVERLAY)
    assert tcp(topo.server, at(MACHINE_VETH), at(MACHINE_OVERLAY)) == ["refused", "open"]


def _flood(topo: Topology, count: int) -> tuple[subprocess.Popen[bytes], Lines]:
    script = str(Path(__file__).with_name("watch_flood.py"))
    flood = subprocess.Popen(
        topo.lan.exec_argv([sys.executable, script, MACHINE_OVERLAY, str(PORT), str(count)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    topo.lab.processes.append(flood)  # stopped by PID, also on failure
    return flood, Lines(flood)


def _admin_served(topo: Topology) -> None:
    version = cli(topo.server, "version", "-n", MACHINE_OVERLAY)
    assert version.returncode == 0, version.stderr
    assert "Tag:         v0.1.0" in version.stdout
    got = cli(topo.server, "get", "ss", "-n", MACHINE_OVERLAY, "-o", "json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["spec"]["connected"] is True


def test_a_reader_holding_300_watches_does_not_lock_the_admin_out(topo: Topology) -> None:
    machine = Machine(topo)
    machine.send(op="status", host="sl.example:443", connected=True, link="siderolink")
    # Bound to the overlay address: the LAN host (routed through the underlay) holds nothing.
    machine.send(op="apply", target=MACHINE_OVERLAY)
    flood, lines = _flood(topo, 300)
    report = json.loads(lines.read(60))
    assert report["open"] == 0 and report["refused"] == {"PERMISSION_DENIED": 300}, report
    assert report["details"] == [
        "PERMISSION_DENIED: the maintenance API answers only over SideroLink"
    ]
    _admin_served(topo)
    flood.kill()
    flood.wait(10)
    # Listening everywhere (SideroLink not configured) everyone is a reader: one address
    # holds its 16 streams and no more, and the others are served meanwhile.
    machine.send(op="prefix", prefix=None)
    machine.send(op="apply", target="all")
    flood, lines = _flood(topo, 300)
    report = json.loads(lines.read(60))
    assert report["open"] == 16 and report["refused"] == {"RESOURCE_EXHAUSTED": 284}, report
    assert report["details"] == [
        "RESOURCE_EXHAUSTED: too many open watches from this address (16 at most per reader); "
        "close some and watch again"
    ]
    _admin_served(topo)
    # Once the reader closes its streams it may watch again.
    assert flood.stdin is not None
    flood.stdin.write(b"close\n")
    flood.stdin.flush()
    assert json.loads(lines.read(30)) == {"reopened": True}
    assert flood.wait(10) == 0
