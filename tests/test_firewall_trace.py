"""`firewall trace` follows real packets through the agent's live table, and says what
`firewall explain` says about the same packets; `firewall show` counts them per rule.

A machine runs the agent in block mode with one rule opening TCP 8080 to the server's
underlay address. From the server's namespace we send, one at a time, packets the table treats
differently; for each, `trace --count 1` inside the machine's namespace reports the rules the
kernel walked. No listener runs on the machine, so every flow is a single inbound packet
(a refused SYN is answered with a RST) and every traced packet is a new one, as `explain
--state new` assumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab

pytestmark = pytest.mark.netns

GK = [sys.executable, "-m", "gatekeeper", "firewall"]
POLICY = """apiVersion: v1alpha1
kind: NetworkDefaultActionConfig
ingress: block
---
apiVersion: v1alpha1
kind: NetworkRuleConfig
name: web-from-server
portSelector:
  ports: [8080]
  protocol: tcp
ingress:
  - subnet: fd00:6b:1::1/128
"""
SEND = """
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if proto == "tcp":
    s = socket.socket(socket.AF_INET6)
    s.settimeout(1)
    s.connect_ex((host, port))
else:
    socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b"x", (host, port))
"""


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


@pytest.fixture
def machine(sl: SideroLinkLab) -> Machine:
    sl.start_server()
    m = sl.add_machine(start=False)
    policy = m.run_dir / "firewall.yaml"
    policy.write_text(POLICY)
    sl.start_agent(m, "--firewall-config", str(policy))
    assert sl.wait_connected(m)["firewall"] == "ok"
    return m


def firewall(m: Machine, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        m.ns.exec_argv([*GK, *args]), capture_output=True, text=True, timeout=60, check=False
    )


def traced(sl: SideroLinkLab, m: Machine, proto: str, port: int | None) -> dict[str, Any]:
    """Start `trace --count 1`, send one packet once it listens, return what it printed."""
    filters = ["--iif", "eth0", "--src", sl.server_underlay, "--proto", proto]
    if port is not None:
        filters += ["--dport", str(port)]
    proc = subprocess.Popen(
        m.ns.exec_argv([*GK, "trace", "--json", "--count", "1", "--seconds", "20", *filters]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        ready = proc.stderr.readline()
        assert ready.startswith("tracing for 20 s"), ready + proc.stderr.read()
        if proto == "icmpv6":
            send = ["ping", "-6", "-c", "1", "-W", "1", m.underlay]
        else:
            send = [sys.executable, "-c", SEND, proto, m.underlay, str(port)]
        subprocess.run(sl.server_ns.exec_argv(send), capture_output=True, timeout=10, check=False)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    (line,) = out.splitlines()
    result: dict[str, Any] = json.loads(line)
    return result


def explained(sl: SideroLinkLab, m: Machine, proto: str, port: int | None) -> dict[str, Any]:
    args = ["explain", "--json", "--run-dir", str(m.run_dir)]
    args += ["--iif", "eth0", "--src", sl.server_underlay, "--proto", proto]
    if port is not None:
        args += ["--dport", str(port)]
    done = firewall(m, *args)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def steps(path: list[dict[str, Any]]) -> list[tuple[str, int | None, str, str]]:
    return [(s["chain"], s["rule_index"], s["verdict"], s["rule_text"]) for s in path]


@pytest.mark.parametrize(
    ("proto", "port", "verdict"),
    [
        ("tcp", 22, "drop"),
        ("tcp", 8080, "accept"),
        ("udp", 9999, "drop"),
        ("icmpv6", None, "accept"),
    ],
)
def test_trace_agrees_with_explain_on_real_packets(
    sl: SideroLinkLab, machine: Machine, proto: str, port: int | None, verdict: str
) -> None:
    trace = traced(sl, machine, proto, port)
    assert trace["packet"] == {
        "iif": "eth0",
        "src": sl.server_underlay,
        "proto": proto,
        "dport": port,
    }
    assert trace["verdict"] == verdict
    explanation = explained(sl, machine, proto, port)
    assert explanation["verdict"] == verdict
    assert steps(trace["path"]) == steps(explanation["path"])

    # The deciding rule's kernel counter saw the packet (a policy verdict has no counter).
    deciding = trace["path"][-1]
    if deciding["rule_index"] is not None:
        shown = json.loads(
            firewall(machine, "show", "--json", "--run-dir", str(machine.run_dir)).stdout
        )
        (chain,) = [c for c in shown["live"]["chains"] if c["name"] == deciding["chain"]]
        rule = chain["rules"][deciding["rule_index"] - 1]
        assert rule["packets"] >= 1 and rule["bytes"] >= 40


def test_trace_cleans_up_and_says_when_nothing_matched(sl: SideroLinkLab, machine: Machine) -> None:
    quiet = firewall(machine, "trace", "--proto", "udp", "--dport", "9", "--seconds", "1")
    assert quiet.returncode == 3 and quiet.stdout == ""
    assert "no matching packet reached table inet gatekeeper" in quiet.stderr
    tables = machine.ns.run(["nft", "list", "tables"])
    assert "gatekeeper_trace" not in tables and "inet gatekeeper" in tables

    # Stopped midway (SIGTERM, as a service manager does): the marking table goes too.
    proc = subprocess.Popen(
        machine.ns.exec_argv([*GK, "trace", "--seconds", "60"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stderr.readline().startswith("tracing for")
        assert "gatekeeper_trace" in machine.ns.run(["nft", "list", "tables"])
        proc.terminate()  # `ip netns exec` execs: this PID is the trace itself
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "gatekeeper_trace" not in machine.ns.run(["nft", "list", "tables"])

    text = firewall(machine, "show", "--run-dir", str(machine.run_dir)).stdout
    assert "#  PACKETS      BYTES RULE" in text

    bad = firewall(machine, "trace", "--dport", "22")
    assert bad.returncode == 1
    assert bad.stderr == "gatekeeper firewall: --dport needs --proto tcp or --proto udp\n"
    # The server's namespace has no agent table: nothing to trace, one clear line.
    none = subprocess.run(
        sl.server_ns.exec_argv([*GK, "trace", "--seconds", "1"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert none.returncode == 1
    assert "table inet gatekeeper is not loaded here" in none.stderr
