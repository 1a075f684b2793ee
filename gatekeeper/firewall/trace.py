"""`firewall trace`, sans-I/O: the rule that marks packets, and reading the kernel's traces.

The marking rule lives in a table of its own, `inet gatekeeper_trace`, on the prerouting hook
at priority -300 (before conntrack and before both of the agent's chains), and sets
`meta nftrace` for packets that match the filter. A separate table rather than a rule inside
`inet gatekeeper`: the agent replaces its table whole whenever its documents change, which
would silently end the trace, and a trace must never change what the agent's table says.

The kernel then reports every chain and rule each marked packet passes. `nft monitor`
prints those reports as text lines (`trace id ID inet gatekeeper CHAIN rule ... # handle N
(verdict accept)`); nftables 1.0.6 has no JSON for traces, and libnftables runs a monitor
only to its end, so the lines of the `nft` process are parsed here. Rules are named by their
position in the chain, as `firewall explain` names them, from the live table's handles.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gatekeeper.firewall import listing
from gatekeeper.firewall.ruleset import (
    INGRESS_CHAIN,
    L4PROTO_NAMES,
    L4PROTO_NUMBERS,
    TABLE_FAMILY,
    TABLE_NAME,
)

JSON = dict[str, Any]
TRACE_TABLE = "gatekeeper_trace"
TRACE_PRIORITY = -300
_TABLE: JSON = {"family": TABLE_FAMILY, "name": TRACE_TABLE}
_L4 = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmpv6": "ipv6-icmp"}
_L4_NAMES = {v: k for k, v in _L4.items()}


class TraceFilterError(ValueError):
    """The filter is inconsistent; the message names the option."""


@dataclass(frozen=True)
class TraceFilter:
    iif: str | None = None
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    proto: str | None = None
    dport: int | None = None

    @classmethod
    def make(
        cls, iif: str | None, src: str | None, proto: str | None, dport: int | None
    ) -> TraceFilter:
        network = None
        if src is not None:
            try:
                network = ipaddress.ip_network(src, strict=False)
            except ValueError:
                raise TraceFilterError(f"--src: {src!r} is not an address or prefix") from None
        if proto is not None and proto not in _L4:
            raise TraceFilterError(f"--proto: {proto!r} is not one of {', '.join(_L4)}")
        if dport is not None:
            if proto not in ("tcp", "udp"):
                raise TraceFilterError("--dport needs --proto tcp or --proto udp")
            if not 0 <= dport <= 65535:
                raise TraceFilterError(f"--dport: {dport} is out of range 0-65535")
        if network is not None and proto in ("icmp", "icmpv6"):
            want = 4 if proto == "icmp" else 6
            if network.version != want:
                raise TraceFilterError(
                    f"--proto {proto} does not go with an IPv{network.version} --src"
                )
        if iif is not None and (not iif or len(iif) > 15 or not iif.isprintable()):
            raise TraceFilterError(f"--iif: {iif[:20]!r} is not an interface name")
        return cls(iif, network, proto, dport)

    def match_expr(self) -> list[JSON]:
        def match(left: JSON, right: Any) -> JSON:
            return {"match": {"op": "==", "left": left, "right": right}}

        expr: list[JSON] = []
        if self.iif is not None:
            expr.append(match({"meta": {"key": "iifname"}}, self.iif))
        if self.src is not None:
            proto = "ip" if self.src.version == 4 else "ip6"
            net = self.src
            right: Any = (
                str(net.network_address)
                if net.prefixlen == net.max_prefixlen
                else {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
            )
            expr.append(match({"payload": {"protocol": proto, "field": "saddr"}}, right))
        if self.dport is not None and self.proto is not None:
            expr.append(match({"payload": {"protocol": self.proto, "field": "dport"}}, self.dport))
        elif self.proto is not None:
            expr.append(match({"meta": {"key": "l4proto"}}, L4PROTO_NUMBERS[_L4[self.proto]]))
        return expr


def start_commands(flt: TraceFilter) -> JSON:
    """One transaction: a fresh trace table (replacing one a killed trace left behind)."""
    rule = [*flt.match_expr(), {"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}}]
    ref = {"family": TABLE_FAMILY, "table": TRACE_TABLE}
    return {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"add": {"table": dict(_TABLE)}},
            {"delete": {"table": dict(_TABLE)}},
            {"add": {"table": dict(_TABLE)}},
            {
                "add": {
                    "chain": {
                        **ref,
                        "name": "mark",
                        "type": "filter",
                        "hook": "prerouting",
                        "prio": TRACE_PRIORITY,
                        "policy": "accept",
                    }
                }
            },
            {"add": {"rule": {**ref, "chain": "mark", "expr": rule}}},
        ]
    }


def stop_commands() -> JSON:
    return {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"add": {"table": dict(_TABLE)}},
            {"delete": {"table": dict(_TABLE)}},
        ]
    }


# The line `nft monitor` prints once the trace table exists: the monitor is listening.
READY_PREFIX = f"add table {TABLE_FAMILY} {TRACE_TABLE}"

_TRACE = re.compile(r"^trace id (?P<id>[0-9a-f]+) (?P<family>\S+) (?P<table>\S+) (?P<chain>\S+) ")
_HANDLE = re.compile(r"# handle (\d+)")
_VERDICT = re.compile(r"\(verdict (\w+)")
_POLICY = re.compile(r" policy (\w+)")


@dataclass(frozen=True)
class TraceEvent:
    trace_id: str
    table: str
    chain: str
    kind: str  # packet, rule, policy (others, such as return, are ignored)
    handle: int | None = None
    verdict: str | None = None
    packet: str = ""  # the packet description, for kind packet


def parse_trace_line(line: str) -> TraceEvent | None:
    """One event of our table from a `nft -a monitor` line; None for anything else."""
    m = _TRACE.match(line)
    if m is None or m["family"] != TABLE_FAMILY or m["table"] != TABLE_NAME:
        return None
    rest = line[m.end() :]
    if rest.startswith("packet: "):
        return TraceEvent(m["id"], m["table"], m["chain"], "packet", packet=rest[8:].strip())
    if rest.startswith("rule "):
        handle = _HANDLE.search(rest)
        verdict = _VERDICT.search(rest)
        return TraceEvent(
            m["id"],
            m["table"],
            m["chain"],
            "rule",
            handle=int(handle[1]) if handle else None,
            verdict=verdict[1] if verdict else None,
        )
    policy = _POLICY.match(" " + rest)
    if policy:
        return TraceEvent(m["id"], m["table"], m["chain"], "policy", verdict=policy[1])
    return None


@dataclass(frozen=True)
class SeenPacket:
    iif: str | None
    src: str | None
    proto: str | None
    dport: int | None

    @classmethod
    def parse(cls, text: str) -> SeenPacket:
        def find(pattern: str) -> str | None:
            m = re.search(pattern, text)
            return m[1] if m else None

        proto = find(r"\bip protocol (\S+)") or find(r"\bip6 nexthdr (\S+)")
        if proto is not None and proto.isdigit():  # a system without /etc/protocols
            proto = L4PROTO_NAMES.get(int(proto), proto)
        proto = _L4_NAMES.get(proto or "", proto)
        dport = find(rf"\b{proto} dport (\d+)") if proto in ("tcp", "udp") else None
        return cls(
            iif=find(r'\biif "([^"]+)"'),
            src=find(r"\bip6? saddr (\S+)"),
            proto=proto,
            dport=int(dport) if dport else None,
        )

    def text(self) -> str:
        port = f" dport {self.dport}" if self.dport is not None else ""
        return f"iif {self.iif or '?'} src {self.src or '?'} {self.proto or '?'}{port}"


@dataclass(frozen=True)
class Step:
    """One base chain's verdict for the packet, named as `firewall explain` names it."""

    chain: str
    verdict: str
    rule_index: int | None  # None: the chain policy
    rule_text: str = ""
    comment: str = ""

    def describe(self) -> str:
        if self.rule_index is None:
            return f"{self.chain}: no rule matched, chain policy {self.verdict}"
        return f"{self.chain} rule {self.rule_index} [{self.comment}]: {self.rule_text}"


@dataclass
class TracedPacket:
    trace_id: str
    packet: SeenPacket | None = None
    path: list[Step] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return self.path[-1].verdict if self.path else "accept"

    def complete(self) -> bool:
        """Dropped anywhere, or judged by the input chain: our table is done with it."""
        return any(s.verdict == "drop" or s.chain == INGRESS_CHAIN for s in self.path)

    def text(self) -> str:
        lines = [
            f"packet {self.trace_id}: {self.packet.text() if self.packet else '?'}",
            f"verdict: {self.verdict.upper()}",
        ]
        if self.path:
            lines.append(f"decided by: {self.path[-1].describe()}")
        if not self.complete():
            lines.append("(not seen on the input hook: not addressed to this machine)")
        lines.append("path:")
        lines += [f"  {s.describe()}" for s in self.path]
        return "\n".join(lines)

    def as_dict(self) -> JSON:
        p = self.packet
        return {
            "id": self.trace_id,
            "packet": None
            if p is None
            else {"iif": p.iif, "src": p.src, "proto": p.proto, "dport": p.dport},
            "verdict": self.verdict,
            "path": [
                {
                    "chain": s.chain,
                    "verdict": s.verdict,
                    "rule_index": s.rule_index,
                    "rule_text": s.rule_text,
                    "comment": s.comment,
                }
                for s in self.path
            ],
        }


class RuleNames:
    """Rule handle -> (chain, 1-based position, text, comment), from a `list table` answer."""

    def __init__(self, objects: Iterable[JSON]) -> None:
        objects = list(objects)
        view = listing.table_view(objects)
        self._by_handle: dict[int, tuple[str, int, str, str]] = {}
        positions: dict[str, int] = {}
        for obj in objects:
            rule = obj.get("rule")
            if not isinstance(rule, dict) or "handle" not in rule:
                continue
            chain = str(rule.get("chain"))
            positions[chain] = positions.get(chain, 0) + 1
            line = view.chain_rules(chain)[positions[chain] - 1]
            self._by_handle[int(rule["handle"])] = (
                chain,
                positions[chain],
                line.text,
                line.comment,
            )

    def get(self, handle: int) -> tuple[str, int, str, str] | None:
        return self._by_handle.get(handle)


class TraceAssembler:
    """Feeds on trace events; hands back each packet once our table is done with it."""

    def __init__(self, names: RuleNames) -> None:
        self.names = names
        self._open: dict[str, TracedPacket] = {}

    def needs_names(self, event: TraceEvent) -> bool:
        """A rule we cannot name: the table was replaced since it was listed."""
        return event.kind == "rule" and (
            event.handle is None or self.names.get(event.handle) is None
        )

    def feed(self, event: TraceEvent) -> TracedPacket | None:
        packet = self._open.setdefault(event.trace_id, TracedPacket(event.trace_id))
        if event.kind == "packet":
            if packet.packet is None:
                packet.packet = SeenPacket.parse(event.packet)
            return None
        if event.kind == "rule" and event.verdict in (None, "continue"):
            return None  # a rule without a verdict (counter only): the walk goes on
        if event.kind == "rule":
            named = self.names.get(event.handle) if event.handle is not None else None
            if named is None:
                step = Step(event.chain, str(event.verdict), 0, "(rule not in the listed table)")
            else:
                chain, index, text, comment = named
                step = Step(chain, str(event.verdict), index, text, comment)
        else:
            step = Step(event.chain, str(event.verdict), None)
        packet.path.append(step)
        if packet.complete():
            return self._open.pop(event.trace_id)
        return None

    def leftovers(self) -> list[TracedPacket]:
        """Packets still open at the end (forwarded ones never reach the input hook)."""
        done = [p for p in self._open.values() if p.path]
        self._open.clear()
        return done
