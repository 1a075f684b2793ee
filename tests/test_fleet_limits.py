"""Limits that stop an attacker without hurting anyone else: a bad-token flood from the same
/64 never refuses a valid token, a machine holding a thousand idle log connections under a low
open-file limit takes neither the server's descriptors nor its Provision, and a storm of
refused tunnel streams is a handful of log lines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetlab import api_target, gk, provisions

from gatekeeper.lab import siderolink_lab
from gatekeeper.lab.siderolink_lab import SideroLinkLab, gatekeeper_argv
from gatekeeper.wireguard.keys import PrivateKey

pytestmark = pytest.mark.netns

SERVER = "fdae:41e4:649b:9303::1"


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def req(token: str) -> dict[str, object]:
    return {
        "node_uuid": str(uuid.uuid4()),
        "node_public_key": PrivateKey.generate().public_key().base64(),
        "join_token": token,
        "node_unique_token": "",
    }


def test_a_flood_in_the_same_64_never_refuses_a_valid_token(sl: SideroLinkLab) -> None:
    sl.start_server()
    # Every lab machine sits in fd00:6b:1::/64, beside the server itself.
    attacker, good = sl.add_machine(start=False), sl.add_machine(start=False)
    flood = provisions(attacker, api_target(sl), [req("wrong") for _ in range(60)])
    assert flood[-1]["code"] == "RESOURCE_EXHAUSTED"
    ok = provisions(good, api_target(sl), [req(sl.join_token) for _ in range(20)])
    assert all("ok" in r for r in ok), ok
    # The server's own namespace (also that /64) too.
    (own,) = provisions(sl.server_ns, api_target(sl), [req(sl.join_token)])
    assert "ok" in own, own
    # A bad token from the good machine is still refused while the /64 is limited.
    (bad,) = provisions(good, api_target(sl), [req("still-wrong")])
    assert bad["code"] == "RESOURCE_EXHAUSTED"


_HOLD = """
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_INET6)
    s.settimeout(5)
    try:
        s.connect((host, port))
    except OSError:
        s.close()
        continue
    socks.append(s)
print("held", flush=True)
time.sleep(float(sys.argv[4]))
still = 0
for s in socks:
    s.setblocking(False)
    try:
        still += s.recv(1) != b""
    except BlockingIOError:
        still += 1
    except OSError:
        pass
print(json.dumps({"connected": len(socks), "open": still}), flush=True)
"""

_LOG_LINE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(sys.argv[3].encode() + b"\\n")
s.close()
"""


def test_log_port_flood_under_a_low_open_file_limit(
    sl: SideroLinkLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server starts with 512 descriptors in all, hard limit included (util-linux prlimit).
    low = ["prlimit", "--nofile=512:512", "--"]
    monkeypatch.setattr(
        siderolink_lab, "gatekeeper_argv", lambda *args: [*low, *gatekeeper_argv(*args)]
    )
    sl.start_server()
    monkeypatch.undo()
    flooder, other = sl.add_machine(), sl.add_machine()
    sl.wait_connected(flooder)
    sl.wait_connected(other)
    # 1,100 idle connections from one registered machine.
    hold = subprocess.Popen(
        flooder.ns.exec_argv([sys.executable, "-c", _HOLD, SERVER, "8092", "1100", "4"]),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert hold.stdout is not None and hold.stdout.readline().strip() == "held"
        started = time.monotonic()
        (fine,) = provisions(other, api_target(sl), [req(sl.join_token)])
        assert "ok" in fine and time.monotonic() - started < 10
        marker = f"still-logging-{uuid.uuid4()}"
        other.ns.run([sys.executable, "-c", _LOG_LINE, SERVER, "8092", json.dumps({"msg": marker})])
        out, _ = hold.communicate(timeout=30)
    finally:
        if hold.poll() is None:
            hold.kill()
            hold.wait()
    held = json.loads(out.strip().splitlines()[-1])
    # The server kept 8 (its per-machine limit) and closed every other one at once.
    assert held["connected"] >= 1000 and held["open"] == 8, held
    deadline = time.monotonic() + 10
    while marker not in gk(sl, "logs", other.node_uuid).stdout:
        assert time.monotonic() < deadline, "the other machine's log line was not stored"
        time.sleep(0.2)
    log = sl.server_log.read_text()
    assert "Traceback" not in log and "Too many open files" not in log
    assert "already has 8 log connections" in log and log.count("log connection from") <= 6


_STREAMS = """
import json, sys, grpc
out = {}
with grpc.insecure_channel(sys.argv[1]) as ch:
    call = ch.stream_stream("/sidero.link.WireGuardOverGRPCService/CreateStream")
    for i in range(int(sys.argv[2])):
        header = "[fdae:41e4:649b:9304::dead]:50889" if i % 2 else "[not-an-address]:1"
        try:
            for _ in call(iter(()), metadata=[("x-siderolink-ipv6-addr", header)], timeout=5):
                pass
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        out[code] = out.get(code, 0) + 1
print(json.dumps(out))
"""


def test_refused_tunnel_streams_are_a_few_log_lines(
    sl: SideroLinkLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Started with a soft open-file limit of 1024 under a hard one of 8192: the server raises
    # its own soft limit to the hard one (tunnel peers and log connections need descriptors).
    low = ["prlimit", "--nofile=1024:8192", "--"]
    monkeypatch.setattr(
        siderolink_lab, "gatekeeper_argv", lambda *args: [*low, *gatekeeper_argv(*args)]
    )
    sl.start_server()
    monkeypatch.undo()
    assert sl.server_proc is not None
    limits = Path(f"/proc/{sl.server_proc.pid}/limits").read_text()
    (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
    assert line.split()[3:5] == ["8192", "8192"], line
    m = sl.add_machine(start=False)
    done = subprocess.run(
        m.ns.exec_argv([sys.executable, "-c", _STREAMS, api_target(sl), "3000"]),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"PERMISSION_DENIED": 1500, "INVALID_ARGUMENT": 1500}
    lines = [x for x in sl.server_log.read_text().splitlines() if "tunnel stream from" in x]
    assert 1 <= len(lines) <= 5, lines[:10]
