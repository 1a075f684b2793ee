"""The firewall on real nftables, with real packets, in network namespaces.

One lab for the module: a machine namespace `m` (underlay eth0, overlay interface named
`siderolink`) and a client namespace `c` with several source addresses, so each case picks
its subnet by binding its socket. Every test applies its own policy with the real CLI.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatekeeper.firewall import listing, render
from gatekeeper.firewall.documents import parse_policy_text
from gatekeeper.firewall.explain import Packet, explain
from gatekeeper.firewall.policy import LinkState
from gatekeeper.firewall.ruleset import build_ruleset
from gatekeeper.lab.netns import Lab, Namespace

pytestmark = pytest.mark.netns

WG_PORT = 51820
TCP_PORTS = (7000, 8080, 9001)
UDP_PORTS = (5353, 6000, WG_PORT)
M4, M6, M_OVERLAY = "10.77.0.1", "fd77::1", "10.66.0.1"
C4_OVERLAY = "10.66.0.2"
CLIENT_ADDRS = ("10.77.1.5", "10.77.2.5", "10.77.3.5", "fd77::15", "fd77::25")
DROP_TIMEOUT = 0.4

SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    tcp, udp, ready = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3]
    def serve_tcp(s):
        while True:
            conn, _ = s.accept()
            conn.close()
    def serve_udp(s):
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(data, peer)
    plan = ((socket.SOCK_STREAM, tcp, serve_tcp), (socket.SOCK_DGRAM, udp, serve_udp))
    for kind, ports, target in plan:
        for port in ports:
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", int(port)))
            if kind == socket.SOCK_STREAM:
                s.listen(64)
            threading.Thread(target=target, args=(s,), daemon=True).start()
    open(ready, "w").close()
    threading.Event().wait()
    """
)

# Each case: send one packet (TCP SYN, UDP datagram, ICMP echo) from a bound source; "accept"
# when anything comes back (SYN-ACK, RST, echo, port unreachable), "drop" on silence.
PROBE = textwrap.dedent(
    """
    import json, socket, sys
    from concurrent.futures import ThreadPoolExecutor
    cases, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
    def probe(case):
        src, dst, proto, port = case["src"], case["dst"], case["proto"], case.get("port")
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        if proto == "icmp":
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
                s.settimeout(timeout)
                s.bind((src, 0))
                body = bytes([8, 0, 0, 0, 0x47, 0x4B, 0, 1]) + b"gatekeeper"
                total = sum(int.from_bytes(body[i:i + 2], "big") for i in range(0, len(body), 2))
                while total >> 16:
                    total = (total & 0xFFFF) + (total >> 16)
                csum = (~total & 0xFFFF).to_bytes(2, "big")
                s.sendto(body[:2] + csum + body[4:], (dst, 0))
                try:
                    while True:
                        data, peer = s.recvfrom(2048)
                        if peer[0] == dst and data[20] == 0:  # echo reply (after the IP header)
                            return "accept"
                except (TimeoutError, socket.timeout):
                    return "drop"
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(fam, kind) as s:
            s.settimeout(timeout)
            s.bind((src, 0))
            try:
                if proto == "tcp":
                    s.connect((dst, port))
                else:
                    s.sendto(b"ping", (dst, port))
                    s.recvfrom(64)
            except ConnectionRefusedError:
                return "accept"
            except (TimeoutError, socket.timeout):
                return "drop"
            return "accept"
    with ThreadPoolExecutor(len(cases) or 1) as pool:
        print(json.dumps(list(pool.map(probe, cases))))
    """
)

OTHER_TABLE = textwrap.dedent(
    """
    table inet other {
        chain input {
            type filter hook input priority 10; policy accept;
            tcp dport 1 counter accept comment "someone else's rule"
        }
    }
    table ip legacy {
        chain forward {
            type filter hook forward priority 0; policy accept;
        }
    }
    """
)


@dataclass
class FwLab:
    lab: Lab
    m: Namespace
    c: Namespace
    workdir: Path

    def gk(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = self.m.exec_argv([sys.executable, "-m", "gatekeeper", "firewall", *argv])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def apply(self, text: str, *extra: str) -> Path:
        path = self.write("policy.yaml", text)
        self.gk("apply", "--wireguard-port", str(WG_PORT), *extra, str(path))
        return path

    def probe(self, cases: list[dict[str, object]], ns: Namespace | None = None) -> list[str]:
        out = (ns or self.c).run(
            [sys.executable, "-c", PROBE, json.dumps(cases), str(DROP_TIMEOUT)], timeout=30
        )
        result: list[str] = json.loads(out)
        return result

    def other_tables(self) -> str:
        return self.m.run(["nft", "list", "table", "inet", "other"]) + self.m.run(
            ["nft", "list", "table", "ip", "legacy"]
        )


@pytest.fixture(scope="module")
def fw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FwLab]:
    workdir = tmp_path_factory.mktemp("fw")
    with Lab(prefix="gkfw") as lab:
        m, c = lab.namespace("m"), lab.namespace("c")
        lab.veth(m, f"{M4}/16", c, "10.77.0.2/16")
        lab.veth(m, f"{M_OVERLAY}/24", c, f"{C4_OVERLAY}/24", a_if="siderolink", b_if="sl0")
        m.run(["ip", "addr", "add", f"{M6}/64", "dev", "eth0", "nodad"])
        c.run(["ip", "addr", "add", "fd77::2/64", "dev", "eth0", "nodad"])
        for addr in CLIENT_ADDRS:
            plen = "64" if ":" in addr else "16"
            extra = ["nodad"] if ":" in addr else []
            c.run(["ip", "addr", "add", f"{addr}/{plen}", "dev", "eth0", *extra])
        ready = workdir / "server.ready"
        lab.spawn(
            m,
            [
                sys.executable,
                "-c",
                SERVER,
                ",".join(map(str, TCP_PORTS)),
                ",".join(map(str, UDP_PORTS)),
                str(ready),
            ],
        )
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.02)
        other = workdir / "other.nft"
        other.write_text(OTHER_TABLE)
        m.run(["nft", "-f", str(other)])
        yield FwLab(lab, m, c, workdir)


BLOCK = textwrap.dedent(
    """\
    apiVersion: v1alpha1
    kind: NetworkDefaultActionConfig
    ingress: block
    ---
    apiVersion: v1alpha1
    kind: NetworkRuleConfig
    name: web
    portSelector:
      ports: [8080, "9000-9001"]
      protocol: tcp
    ingress:
      - subnet: 10.77.1.0/24
      - subnet: fd77::10/124
    ---
    apiVersion: v1alpha1
    kind: NetworkRuleConfig
    name: mdns
    portSelector:
      ports: [5353]
      protocol: udp
    ingress:
      - subnet: 10.77.0.0/16
        except: 10.77.3.0/24
    """
)

ACCEPT = textwrap.dedent(
    """\
    apiVersion: v1alpha1
    kind: NetworkDefaultActionConfig
    ingress: accept
    ---
    apiVersion: v1alpha1
    kind: NetworkRuleConfig
    name: web
    portSelector:
      ports: [8080]
      protocol: tcp
    ingress:
      - subnet: 10.77.1.0/24
    """
)

# (iif, src, dst, proto, port, expected)
Case = tuple[str, str, str, str, int | None, str]
BLOCK_CASES: list[Case] = [
    ("eth0", "10.77.1.5", M4, "tcp", 8080, "accept"),  # allowed subnet
    ("eth0", "10.77.2.5", M4, "tcp", 8080, "drop"),  # other subnet
    ("eth0", "10.77.1.5", M4, "tcp", 9001, "accept"),  # inside the range
    ("eth0", "10.77.1.5", M4, "tcp", 7000, "drop"),  # port no rule opens
    ("eth0", "fd77::15", M6, "tcp", 8080, "accept"),  # IPv6 subnet
    ("eth0", "fd77::25", M6, "tcp", 8080, "drop"),
    ("eth0", "10.77.2.5", M4, "udp", 5353, "accept"),  # subnet minus except
    ("eth0", "10.77.3.5", M4, "udp", 5353, "drop"),  # carved out by except
    ("eth0", "10.77.2.5", M4, "udp", WG_PORT, "accept"),  # WireGuard port, always
    ("eth0", "fd77::25", M6, "udp", WG_PORT, "accept"),
    ("eth0", "10.77.2.5", M4, "udp", 6000, "drop"),
    ("eth0", "10.77.2.5", M4, "icmp", None, "accept"),  # rate-limited ICMP
    ("sl0", C4_OVERLAY, M_OVERLAY, "tcp", 7000, "accept"),  # trusted overlay interface
    ("sl0", C4_OVERLAY, M_OVERLAY, "udp", 6000, "accept"),
]


def _without_counters(listing: str) -> str:
    return re.sub(r"counter packets \d+ bytes \d+ ", "", listing)


def _machine_iif(client_if: str) -> str:
    return {"eth0": "eth0", "sl0": "siderolink"}[client_if]


def _run_cases(fw: FwLab, policy_text: str, cases: list[Case]) -> None:
    got = fw.probe([{"src": s, "dst": d, "proto": p, "port": n} for _, s, d, p, n, _ in cases])
    ruleset = build_ruleset(parse_policy_text(policy_text), LinkState(wireguard_ports=(WG_PORT,)))
    problems = []
    for (iif, src, _dst, proto, port, expected), real in zip(cases, got, strict=True):
        model = explain(ruleset, Packet.make(_machine_iif(iif), src, proto, port)).verdict.value
        if not real == model == expected:
            problems.append(
                f"{iif} {src} {proto}/{port}: real {real}, explain {model}, want {expected}"
            )
    assert not problems, "\n".join(problems)


def test_block_mode_rules_subnets_except_wireguard_and_overlay(fw: FwLab) -> None:
    before = fw.other_tables()
    fw.apply(BLOCK)
    _run_cases(fw, BLOCK, BLOCK_CASES)
    assert fw.other_tables() == before


def test_accept_mode_drops_outside_subnets_for_that_port_only(fw: FwLab) -> None:
    before = fw.other_tables()
    fw.apply(ACCEPT)
    cases: list[Case] = [
        ("eth0", "10.77.1.5", M4, "tcp", 8080, "accept"),
        ("eth0", "10.77.2.5", M4, "tcp", 8080, "drop"),
        ("eth0", "fd77::15", M6, "tcp", 8080, "drop"),  # no IPv6 subnet named: all dropped
        ("eth0", "10.77.2.5", M4, "tcp", 7000, "accept"),  # other ports untouched
        ("eth0", "10.77.2.5", M4, "udp", 6000, "accept"),
        ("sl0", C4_OVERLAY, M_OVERLAY, "tcp", 8080, "accept"),
    ]
    _run_cases(fw, ACCEPT, cases)
    assert fw.other_tables() == before


def test_explain_cli_agrees_with_the_model(fw: FwLab) -> None:
    path = fw.apply(BLOCK)
    out = fw.gk(
        "explain",
        "-c",
        str(path),
        "--iif",
        "eth0",
        "--src",
        "10.77.3.5",
        "--proto",
        "udp",
        "--dport",
        "5353",
        "--json",
    )
    result = json.loads(out.stdout)
    assert result["verdict"] == "drop"
    assert result["deciding"]["comment"] == "gatekeeper: new UDP"
    # Without --wireguard-port, explain takes the port from the live table.
    out = fw.gk(
        "explain",
        "-c",
        str(path),
        "--iif",
        "eth0",
        "--src",
        "10.77.3.5",
        "--proto",
        "udp",
        "--dport",
        str(WG_PORT),
    )
    assert "verdict: ACCEPT" in out.stdout
    assert "wireguard listen port" in out.stdout


def test_ipv6_neighbour_discovery_survives_block_mode(fw: FwLab) -> None:
    fw.apply(BLOCK)
    # Flush both neighbour caches again and again, faster than the ICMPv6 rate limit
    # (5/second) would let solicitations through if they were only rate-limited.
    for _ in range(8):
        for ns in (fw.m, fw.c):
            ns.run(["ip", "-6", "neigh", "flush", "dev", "eth0"])
        cases = [{"src": "fd77::2", "dst": M6, "proto": "udp", "port": WG_PORT}]
        assert fw.probe(cases) == ["accept"]
    neigh = fw.c.run(["ip", "-6", "neigh", "show", "dev", "eth0"])
    assert M6 in neigh


def test_apply_is_idempotent_and_show_reports_hand_edits(fw: FwLab) -> None:
    path = fw.apply(BLOCK)
    first = fw.m.run(["nft", "list", "table", "inet", "gatekeeper"])
    fw.apply(BLOCK)
    second = fw.m.run(["nft", "list", "table", "inet", "gatekeeper"])
    assert _without_counters(first) == _without_counters(second)

    shown = fw.gk("show", "-c", str(path))
    assert "identical to the live table" in shown.stdout
    assert "chain ingress (hook input, priority -140, policy drop)" in shown.stdout
    assert "DIFF" not in shown.stdout

    fw.m.run(
        ["nft", "add", "rule", "inet", "gatekeeper", "ingress", "tcp", "dport", "7000", "accept"]
    )
    shown = fw.gk("show", "-c", str(path), "--exit-code", check=False)
    assert shown.returncode == 3
    assert "DIFF" in shown.stdout
    assert "+  tcp dport 7000 accept" in shown.stdout
    as_json = json.loads(fw.gk("show", "-c", str(path), "--json").stdout)
    assert as_json["in_sync"] is False
    assert any("7000" in line for line in as_json["diff"])
    fw.apply(BLOCK)
    assert "identical" in fw.gk("show", "-c", str(path)).stdout


def test_invalid_policy_leaves_the_previous_one_in_force(fw: FwLab) -> None:
    fw.apply(BLOCK)
    before = fw.m.run(["nft", "list", "table", "inet", "gatekeeper"])
    # Bad documents: rejected before the kernel is touched.
    bad = fw.write("bad.yaml", BLOCK.replace("10.77.1.0/24", "10.77.1.0/33"))
    out = fw.gk("apply", "--wireguard-port", str(WG_PORT), str(bad), check=False)
    assert out.returncode == 1
    assert "ingress[0].subnet: invalid subnet: 10.77.1.0/33" in out.stderr
    # A ruleset the kernel refuses (an interface name longer than IFNAMSIZ): nothing changes.
    good = fw.write("good.yaml", BLOCK)
    script = textwrap.dedent(
        f"""
        import json
        from gatekeeper.firewall.controller import FirewallController
        from gatekeeper.firewall.policy import LinkState
        ctl = FirewallController(paths=[{str(good)!r}])
        ok = ctl.reconcile(LinkState(wireguard_ports=({WG_PORT},)))
        bad = ctl.reconcile(LinkState(wireguard_ports=(4000,), extra_trusted=("x" * 40,)))
        print(json.dumps([ok.changed, ok.in_force, bad.in_force, bad.error]))
        """
    )
    changed, in_force, bad_in_force, error = json.loads(fw.m.run([sys.executable, "-c", script]))
    assert (changed, in_force, bad_in_force) == (False, True, False)
    assert "previous one kept" in error and "exceeds maximum length" in error
    after = fw.m.run(["nft", "list", "table", "inet", "gatekeeper"])
    assert _without_counters(after) == _without_counters(before)
    _run_cases(fw, BLOCK, BLOCK_CASES[:3])


def test_an_alias_bomb_is_refused_at_once_and_the_ruleset_stays(fw: FwLab) -> None:
    fw.apply(BLOCK)
    before = fw.m.run(["nft", "list", "table", "inet", "gatekeeper"])
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    pairs = zip("abcdefgh", "bcdefghi", strict=True)
    levels += [f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in pairs]
    bomb = fw.write(
        "bomb.yaml",
        "apiVersion: v1alpha1\nkind: NetworkRuleConfig\n"
        + "".join(f"x{i}: {level}\n" for i, level in enumerate(levels))
        + "name: web\nportSelector:\n  ports: *i\n  protocol: tcp\n",
    )
    started = time.monotonic()
    out = fw.gk("apply", "--wireguard-port", str(WG_PORT), str(bomb), check=False)
    elapsed = time.monotonic() - started
    assert out.returncode == 1 and elapsed < 10, (out, elapsed)
    assert out.stderr.splitlines() == [
        f"gatekeeper firewall: {bomb} document 1: invalid YAML: aliases expand to more than "
        "1,000,000 nodes (an alias bomb?)"
    ]
    # The agent's controller: the bad reload is reported and the policy in force kept.
    good = fw.write("good.yaml", BLOCK)
    script = textwrap.dedent(
        f"""
        import json, shutil
        from gatekeeper.firewall.controller import FirewallController
        from gatekeeper.firewall.policy import LinkState
        ctl = FirewallController(paths=[{str(good)!r}])
        shutil.copy({str(bomb)!r}, {str(good)!r})
        error = ctl.reload()
        result = ctl.reconcile(LinkState(wireguard_ports=({WG_PORT},)))
        print(json.dumps([error, result.changed, result.in_force]))
        """
    )
    error, changed, in_force = json.loads(fw.m.run([sys.executable, "-c", script], timeout=30))
    assert error.endswith(
        "invalid YAML: aliases expand to more than 1,000,000 nodes (an alias bomb?)"
    )
    assert (changed, in_force) == (False, True)
    after = fw.m.run(["nft", "list", "table", "inet", "gatekeeper"])
    assert _without_counters(after) == _without_counters(before)


def test_reconcile_follows_the_listen_port(fw: FwLab) -> None:
    good = fw.write("port.yaml", BLOCK)
    script = textwrap.dedent(
        f"""
        import json
        from gatekeeper.firewall.controller import FirewallController
        from gatekeeper.firewall.policy import LinkState
        ctl = FirewallController(paths=[{str(good)!r}])
        a = ctl.reconcile(LinkState(wireguard_ports=(6000,)))
        b = ctl.reconcile(LinkState(wireguard_ports=(6000,)))
        print(json.dumps([a.changed, b.changed]))
        """
    )
    assert json.loads(fw.m.run([sys.executable, "-c", script])) == [True, False]
    got = fw.probe(
        [
            {"src": "10.77.2.5", "dst": M4, "proto": "udp", "port": 6000},
            {"src": "10.77.2.5", "dst": M4, "proto": "udp", "port": WG_PORT},
        ]
    )
    assert got == ["accept", "drop"]


# A worker inside the machine namespace: one JSON transaction per line in, one result out.
WORKER = textwrap.dedent(
    """
    import json, sys
    from gatekeeper.firewall.apply import FirewallApplyError, Nftables
    from gatekeeper.firewall import listing
    nft = Nftables()
    for line in sys.stdin:
        try:
            nft.apply(json.loads(line))
            live = nft.list_table()
            print(json.dumps({"ok": True, "lines": listing.table_view(live or []).lines()}))
        except FirewallApplyError as exc:
            print(json.dumps({"ok": False, "error": str(exc)}))
        sys.stdout.flush()
    """
)

_port = st.integers(0, 65535)
_v4 = st.builds(
    lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}", st.integers(0, 2**32 - 1), st.integers(0, 32)
)
_v6 = st.builds(
    lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}", st.integers(0, 2**128 - 1), st.integers(0, 128)
)
_rules = st.lists(
    st.fixed_dictionaries(
        {
            "ports": st.lists(st.tuples(_port, st.integers(0, 50)), min_size=1, max_size=4),
            "protocol": st.sampled_from(["tcp", "udp", "icmp", "icmpv6"]),
            "ingress": st.lists(
                st.fixed_dictionaries(
                    {"subnet": st.one_of(_v4, _v6)},
                    optional={"except": st.one_of(_v4, _v6)},
                ),
                max_size=4,
            ),
        }
    ),
    max_size=4,
)


def _document(mode: str, rules: list[dict[str, Any]]) -> str | None:
    import yaml

    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1alpha1", "kind": "NetworkDefaultActionConfig", "ingress": mode}
    ]
    for i, rule in enumerate(rules):
        ranges, lo = [], 0
        for start, width in rule["ports"]:
            start = max(start, lo)
            if start + width > 65535:
                break
            ranges.append(f"{start}-{start + width}" if width else start)
            lo = start + width + 1
        if not ranges:
            continue
        docs.append(
            {
                "apiVersion": "v1alpha1",
                "kind": "NetworkRuleConfig",
                "name": f"rule-{i}",
                "portSelector": {"ports": ranges, "protocol": rule["protocol"]},
                "ingress": rule["ingress"],
            }
        )
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def kernel_worker(fw: FwLab) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        fw.m.exec_argv([sys.executable, "-c", WORKER]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(mode=st.sampled_from(["accept", "block"]), rules=_rules, wg=st.lists(_port, max_size=2))
def test_kernel_accepts_every_valid_policy_and_lists_it_back_unchanged(
    fw: FwLab,
    kernel_worker: subprocess.Popen[str],
    mode: str,
    rules: list[dict[str, Any]],
    wg: list[int],
) -> None:
    text = _document(mode, rules)
    assert text is not None
    ruleset = build_ruleset(parse_policy_text(text), LinkState(wireguard_ports=tuple(wg)))
    assert kernel_worker.stdin is not None and kernel_worker.stdout is not None
    kernel_worker.stdin.write(json.dumps(render.replace_commands(ruleset)) + "\n")
    kernel_worker.stdin.flush()
    answer = json.loads(kernel_worker.stdout.readline())
    assert answer["ok"], answer.get("error")
    assert answer["lines"] == listing.table_view(render.table_objects(ruleset)).lines()
