"""What the desired ruleset does to one packet, and which rule decides it.

Evaluates the model (not the kernel): the packet walks the prerouting chain (hook priority
-110) and then, unless dropped there, the ingress chain on the input hook. An accept in one
base chain does not skip the next, so the input chain has the last word. The packet is taken
to be addressed to this machine, which is the question an operator asks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from gatekeeper.firewall import listing, render
from gatekeeper.firewall.ruleset import (
    INGRESS_CHAIN,
    PREROUTING_CHAIN,
    Chain,
    Family,
    Rule,
    Ruleset,
    Verdict,
    source_networks,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class State(StrEnum):
    NEW = "new"
    ESTABLISHED = "established"
    RELATED = "related"
    INVALID = "invalid"


PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")
_L4 = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmpv6": "ipv6-icmp"}


class PacketError(ValueError):
    """The packet description is inconsistent (say, icmp from an IPv6 source)."""


@dataclass(frozen=True)
class Packet:
    iif: str
    src: IPAddress
    proto: str
    dport: int | None = None
    state: State = State.NEW
    icmp_type: str = "echo-request"
    # None: some address of this machine that is not an overlay address.
    dst: IPAddress | None = None

    @classmethod
    def make(
        cls,
        iif: str,
        src: str,
        proto: str,
        dport: int | None = None,
        state: str = "new",
        icmp_type: str | None = None,
        dst: str | None = None,
    ) -> Packet:
        try:
            addr = ipaddress.ip_address(src)
        except ValueError:
            raise PacketError(f"--src: {src!r} is not an IP address") from None
        daddr: IPAddress | None = None
        if dst is not None:
            try:
                daddr = ipaddress.ip_address(dst)
            except ValueError:
                raise PacketError(f"--dst: {dst!r} is not an IP address") from None
            if daddr.version != addr.version:
                raise PacketError("--dst and --src must be of the same IP version")
        if proto not in PROTOCOLS:
            raise PacketError(f"--proto: {proto!r} is not one of {', '.join(PROTOCOLS)}")
        if proto == "icmp" and addr.version != 4:
            raise PacketError("--proto icmp needs an IPv4 --src (use icmpv6 for IPv6)")
        if proto == "icmpv6" and addr.version != 6:
            raise PacketError("--proto icmpv6 needs an IPv6 --src (use icmp for IPv4)")
        if proto in ("tcp", "udp"):
            if dport is None:
                raise PacketError(f"--dport is required for {proto}")
            if not 0 <= dport <= 65535:
                raise PacketError(f"--dport: {dport} is out of range 0-65535")
        try:
            st = State(state)
        except ValueError:
            raise PacketError(f"--state: {state!r} is not one of new, established") from None
        port = dport if proto in ("tcp", "udp") else None
        return cls(iif, addr, proto, port, st, icmp_type or "echo-request", daddr)

    @property
    def family(self) -> Family:
        return Family.IPV4 if self.src.version == 4 else Family.IPV6


@dataclass(frozen=True)
class Decision:
    chain: str
    verdict: Verdict
    rule_index: int | None  # 1-based position in the chain, None for the chain policy
    rule_text: str
    comment: str
    note: str = ""

    def describe(self) -> str:
        if self.rule_index is None:
            return f"{self.chain}: no rule matched, chain policy {self.verdict.value}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.chain} rule {self.rule_index} [{self.comment}]: {self.rule_text}{note}"


@dataclass(frozen=True)
class Explanation:
    packet: Packet
    verdict: Verdict
    deciding: Decision
    path: tuple[Decision, ...]

    def text(self) -> str:
        p = self.packet
        port = f" dport {p.dport}" if p.dport is not None else ""
        dst = f" dst {p.dst}" if p.dst is not None else ""
        lines = [
            f"packet: iif {p.iif} src {p.src}{dst} {p.proto}{port} state {p.state.value}",
            f"verdict: {self.verdict.value.upper()}",
            f"decided by: {self.deciding.describe()}",
        ]
        lines.append("path:")
        lines += [f"  {d.describe()}" for d in self.path]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        p = self.packet
        return {
            "packet": {
                "iif": p.iif,
                "src": str(p.src),
                "dst": None if p.dst is None else str(p.dst),
                "proto": p.proto,
                "dport": p.dport,
                "state": p.state.value,
            },
            "verdict": self.verdict.value,
            "deciding": {**asdict(self.deciding), "verdict": self.deciding.verdict.value},
            "path": [{**asdict(d), "verdict": d.verdict.value} for d in self.path],
        }


def _matches(rule: Rule, pkt: Packet) -> bool:
    if rule.iifnames and (pkt.iif in rule.iifnames) == rule.iifnames_negate:
        return False
    if rule.daddr and not (
        pkt.dst is not None and pkt.dst.version == 6 and any(pkt.dst in n for n in rule.daddr)
    ):
        return False
    if rule.fib_daddr_not_local:
        return False  # the packet is addressed to this machine
    if rule.ct_states and pkt.state.value not in rule.ct_states:
        return False
    if rule.family is not None and rule.family is not pkt.family:
        return False
    if rule.saddr:
        inside = any(pkt.src in net for net in rule.saddr if net.version == pkt.src.version)
        if inside == rule.saddr_negate:
            return False
    l4 = _L4[pkt.proto]
    if rule.l4proto is not None and rule.l4proto != l4:
        return False
    if rule.dports and (pkt.dport is None or not any(r.contains(pkt.dport) for r in rule.dports)):
        return False
    if rule.saddr_dport:
        if pkt.dport is None:
            return False
        port = pkt.dport
        inside = any(
            pkt.src in net and pr.contains(port)
            for net, pr in rule.saddr_dport
            if net.version == pkt.src.version
        )
        if inside == rule.saddr_dport_negate:
            return False
    if rule.icmp_types and (l4 != "icmp" or pkt.icmp_type not in rule.icmp_types):
        return False
    return not (rule.icmpv6_types and (l4 != "ipv6-icmp" or pkt.icmp_type not in rule.icmpv6_types))


def _deciding_documents(rule: Rule, pkt: Packet) -> list[str]:
    """The documents behind a grouped rule's verdict for this packet.

    An accept comes from the documents that admit the source on the port; a drop (accept
    mode) from the documents that cover the port but not the source.
    """
    names: list[str] = []
    for doc in rule.documents:
        port = pkt.dport
        if port is not None and not any(pr.contains(port) for pr in doc.ports):
            continue
        nets = source_networks(doc.subnets, doc.excepts, pkt.family)
        inside = any(pkt.src in net for net in nets)
        if inside == (rule.verdict is Verdict.ACCEPT):
            names.append(doc.name)
    return names


def _walk(chain: Chain, pkt: Packet) -> Decision:
    for index, rule in enumerate(chain.rules, start=1):
        if _matches(rule, pkt):
            text, _, _ = listing.expr_text(render.rule_expr(rule))
            note = ""
            if rule.limit is not None:
                note = f"while under {rule.limit[0]}/second; above that the policy decides"
            documents = _deciding_documents(rule, pkt)
            if documents:
                note = "by " + ", ".join(f'NetworkRuleConfig "{name}"' for name in documents)
            return Decision(chain.name, rule.verdict, index, text, rule.comment, note)
    return Decision(chain.name, chain.policy, None, "", "")


def explain(ruleset: Ruleset, packet: Packet) -> Explanation:
    pre = _walk(ruleset.chain(PREROUTING_CHAIN), packet)
    if pre.verdict is Verdict.DROP:
        return Explanation(packet, Verdict.DROP, pre, (pre,))
    ingress = _walk(ruleset.chain(INGRESS_CHAIN), packet)
    return Explanation(packet, ingress.verdict, ingress, (pre, ingress))
