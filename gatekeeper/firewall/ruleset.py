"""The desired ruleset: the policy and the link state turned into chains of typed rules.

This is the one place that decides what the firewall does; `render` turns it into nftables JSON
and `explain` evaluates packets against it, so the two cannot disagree. The shape follows
Talos's `inet talos` table (docs/compatibility.md) with two additions: both overlay interfaces are
trusted, and the WireGuard listen port is always admitted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from gatekeeper.firewall.policy import (
    LOOPBACK,
    OVERLAY_INTERFACES,
    DefaultAction,
    FirewallPolicy,
    LinkState,
    Network,
    NetworkRule,
    PortRange,
    Protocol,
)

TABLE_FAMILY = "inet"
TABLE_NAME = "gatekeeper"
INGRESS_CHAIN = "ingress"
PREROUTING_CHAIN = "prerouting"
# Talos: mangle + 10 on input (before anything else filters), NAT-destination - 10 on
# prerouting (before kube-proxy's DNAT rewrites NodePort traffic out of the input path).
INGRESS_PRIORITY = -140
PREROUTING_PRIORITY = -110

# Comments tag the builtin rules so `show` can tell them apart and recover the link state.
TAG_TRUSTED = "gatekeeper: trusted interfaces"
TAG_WIREGUARD = "gatekeeper: wireguard listen port"
TAG_OVERLAY_GUARD = "gatekeeper: overlay address only via the overlay links"
COMMENT_MAX = 127

# Neighbour discovery must pass a drop policy on an IPv6 underlay, or the WireGuard path dies
# once the neighbour cache entry expires. Router adverts keep SLAAC and default routes alive.
ND_TYPES: tuple[str, ...] = ("nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-advert")
# CVE-1999-0524: timestamp and address-mask requests leak clock and netmask.
ICMP_DROP_TYPES: tuple[str, ...] = (
    "timestamp-request",
    "timestamp-reply",
    "address-mask-request",
    "address-mask-reply",
)
ICMP_RATE_PER_SECOND = 5
ICMP_BURST = 5


class Verdict(StrEnum):
    ACCEPT = "accept"
    DROP = "drop"


class Family(StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @property
    def label(self) -> str:
        return "IPv4" if self is Family.IPV4 else "IPv6"


# IANA protocol numbers for nftables' l4proto names. The ruleset is sent with numbers: a name
# is resolved through /etc/protocols, which minimal systems (Talos, a minbase image) lack, and
# nftables then refuses the whole ruleset ("Could not resolve protocol name").
L4PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "ipv6-icmp": 58}
L4PROTO_NAMES = {n: name for name, n in L4PROTO_NUMBERS.items()}

# nftables' l4proto names for the document protocols.
L4PROTO = {
    Protocol.TCP: "tcp",
    Protocol.UDP: "udp",
    Protocol.ICMP: "icmp",
    Protocol.ICMPV6: "ipv6-icmp",
}


@dataclass(frozen=True)
class Rule:
    """One nftables rule: every set field must match (empty means "any"), then the verdict."""

    verdict: Verdict
    comment: str
    iifnames: tuple[str, ...] = ()
    iifnames_negate: bool = False
    # Destination addresses (IPv6 only: the overlay is IPv6).
    daddr: tuple[ipaddress.IPv6Network, ...] = ()
    ct_states: tuple[str, ...] = ()
    fib_daddr_not_local: bool = False
    family: Family | None = None
    saddr: tuple[Network, ...] = ()
    saddr_negate: bool = False
    l4proto: str | None = None
    dports: tuple[PortRange, ...] = ()
    # Source and port together (`ip saddr . tcp dport`): one element per disjoint piece.
    saddr_dport: tuple[tuple[Network, PortRange], ...] = ()
    saddr_dport_negate: bool = False
    icmp_types: tuple[str, ...] = ()
    icmpv6_types: tuple[str, ...] = ()
    limit: tuple[int, int] | None = None  # packets per second, burst
    documents: tuple[NetworkRule, ...] = ()  # the documents this rule was built from


@dataclass(frozen=True)
class Chain:
    name: str
    hook: str
    priority: int
    policy: Verdict
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Ruleset:
    chains: tuple[Chain, ...]

    def chain(self, name: str) -> Chain:
        for chain in self.chains:
            if chain.name == name:
                return chain
        raise KeyError(name)


def _interval(net: Network) -> tuple[int, int]:
    # Arithmetic rather than net.broadcast_address, which builds two address objects per call
    # (a tenth of the time to turn 1000 documents into a ruleset).
    lo = int(net.network_address)
    return lo, lo | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(
    include: list[tuple[int, int]], exclude: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in include:
        pieces = [(lo, hi)]
        for xlo, xhi in exclude:
            nxt: list[tuple[int, int]] = []
            for plo, phi in pieces:
                if xhi < plo or xlo > phi:
                    nxt.append((plo, phi))
                    continue
                if plo < xlo:
                    nxt.append((plo, xlo - 1))
                if xhi < phi:
                    nxt.append((xhi + 1, phi))
            pieces = nxt
        out.extend(pieces)
    return out


def source_networks(
    subnets: Sequence[Network], excepts: Sequence[Network], family: Family
) -> tuple[Network, ...]:
    """The rule's sources of one family as the fewest CIDRs: union(subnets) - union(excepts)."""
    version = 4 if family is Family.IPV4 else 6
    include = _merge(_interval(n) for n in subnets if n.version == version)
    exclude = _merge(_interval(n) for n in excepts if n.version == version)
    addr_cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    nets: list[Network] = []
    for lo, hi in _subtract(include, exclude):
        nets.extend(ipaddress.summarize_address_range(addr_cls(lo), addr_cls(hi)))
    return tuple(nets)


def _is_everything(nets: tuple[Network, ...]) -> bool:
    return len(nets) == 1 and nets[0].prefixlen == 0


def _comment(text: str) -> str:
    raw = text.encode()
    if len(raw) <= COMMENT_MAX:
        return text
    return raw[: COMMENT_MAX - 3].decode(errors="ignore") + "..."


Intervals = list[tuple[int, int]]


def _family_intervals(rule: NetworkRule, family: Family) -> Intervals:
    version = 4 if family is Family.IPV4 else 6
    include = _merge(_interval(n) for n in rule.subnets if n.version == version)
    exclude = _merge(_interval(n) for n in rule.excepts if n.version == version)
    return _subtract(include, exclude)


def _intersect(a: Intervals, b: Intervals) -> Intervals:
    out: Intervals = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _networks(intervals: Intervals, family: Family) -> list[Network]:
    nets: list[Network] = []
    net_cls: type[Network]
    addr_cls: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    if family is Family.IPV4:
        net_cls, addr_cls, bits = ipaddress.IPv4Network, ipaddress.IPv4Address, 32
    else:
        net_cls, addr_cls, bits = ipaddress.IPv6Network, ipaddress.IPv6Address, 128
    for lo, hi in intervals:
        size = hi - lo + 1
        if size & (size - 1) == 0 and lo & (size - 1) == 0:
            # Already one CIDR (most document subnets): summarize_address_range would find
            # the same, building several address objects on the way.
            nets.append(net_cls((lo, bits - size.bit_length() + 1)))
        else:
            nets.extend(ipaddress.summarize_address_range(addr_cls(lo), addr_cls(hi)))
    return nets


def _port_segments(
    docs: Sequence[tuple[Intervals, tuple[PortRange, ...]]], union: bool
) -> list[tuple[PortRange, Intervals]]:
    """Cut the port axis where any document's range starts or ends; per piece, combine the
    sources of the documents covering it (union for block mode, intersection for accept mode),
    then join neighbouring pieces with equal sources. The pieces never overlap, which the
    kernel's concatenated interval sets require."""
    events: dict[int, list[tuple[int, bool]]] = {}
    for index, (_, ports) in enumerate(docs):
        for pr in ports:
            events.setdefault(pr.lo, []).append((index, True))
            events.setdefault(pr.hi + 1, []).append((index, False))
    points = sorted(events)
    active: set[int] = set()
    pieces: list[tuple[PortRange, Intervals]] = []
    for k, point in enumerate(points):
        for index, starts in events[point]:
            if starts:
                active.add(index)
            else:
                active.discard(index)
        if not active or k + 1 == len(points):
            continue
        members = sorted(active)
        if union:
            combined = _merge(iv for m in members for iv in docs[m][0])
        else:
            combined = docs[members[0]][0]
            for m in members[1:]:
                combined = _intersect(combined, docs[m][0])
        piece = PortRange(point, points[k + 1] - 1)
        if pieces and pieces[-1][1] == combined and pieces[-1][0].hi + 1 == piece.lo:
            pieces[-1] = (PortRange(pieces[-1][0].lo, piece.hi), combined)
        else:
            pieces.append((piece, combined))
    return pieces


def _names(docs: Sequence[NetworkRule]) -> str:
    # Comments are quoted by nft's listing; a quote inside would break the round trip.
    clean = ("".join(c if c.isprintable() and c != '"' else "?" for c in d.name) for d in docs)
    return ", ".join(clean)


def _document_rules(policy: FirewallPolicy) -> list[Rule]:
    """Talos's per-document rules, grouped so the kernel gets a handful of sets, not thousands.

    Block mode: a source in a document's subnets (minus except) is accepted on its ports.
    Accept mode: on a document's ports, a source outside its subnets is dropped, so a family
    a document names no subnet for is dropped as a whole on those ports. Grouping keeps both
    meanings: accepts combine by union, drops by intersection of the allowed sources.
    """
    block = policy.default_action is DefaultAction.BLOCK
    verdict = Verdict.ACCEPT if block else Verdict.DROP
    out: list[Rule] = []
    for proto in (Protocol.TCP, Protocol.UDP):
        docs = [r for r in policy.rules if r.protocol is proto]
        if not docs:
            continue
        for family in (Family.IPV4, Family.IPV6):
            comment = _comment(f"NetworkRuleConfig {proto.value} {family.label}: {_names(docs)}")
            per_doc = [(_family_intervals(d, family), d.ports) for d in docs]
            pieces = _port_segments(per_doc, union=block)
            elements = tuple(
                (net, ports) for ports, ivs in pieces for net in _networks(ivs, family)
            )
            base = Rule(
                verdict,
                comment,
                family=family,
                l4proto=L4PROTO[proto],
                documents=tuple(docs),
            )
            if block:
                if elements:
                    out.append(replace(base, saddr_dport=elements))
                continue
            all_ports = tuple(
                PortRange(lo, hi) for lo, hi in _merge((p.lo, p.hi) for d in docs for p in d.ports)
            )
            out.append(
                replace(
                    base,
                    dports=all_ports,
                    saddr_dport=elements,
                    saddr_dport_negate=bool(elements),
                )
            )
    for proto, family in ((Protocol.ICMP, Family.IPV4), (Protocol.ICMPV6, Family.IPV6)):
        docs = [r for r in policy.rules if r.protocol is proto]
        if not docs:
            continue
        sources = [_family_intervals(d, family) for d in docs]
        if block:
            combined = _merge(iv for src in sources for iv in src)
        else:
            combined = sources[0]
            for src in sources[1:]:
                combined = _intersect(combined, src)
        nets = tuple(_networks(combined, family))
        base = Rule(
            verdict,
            _comment(f"NetworkRuleConfig {proto.value} {family.label}: {_names(docs)}"),
            family=family,
            l4proto=L4PROTO[proto],
            documents=tuple(docs),
        )
        if block:
            if nets:
                out.append(replace(base, saddr=() if _is_everything(nets) else nets))
        elif not _is_everything(nets):
            out.append(replace(base, saddr=nets, saddr_negate=bool(nets)))
    return out


def overlay_guard(link: LinkState) -> list[Rule]:
    """Drop packets for the overlay addresses that arrive on any other link than lo and the
    overlay interfaces (empty before the link has an address)."""
    if not link.overlay_addresses:
        return []
    allowed = tuple(dict.fromkeys([LOOPBACK, *OVERLAY_INTERFACES, *link.overlay_interfaces]))
    nets = tuple(ipaddress.IPv6Network(a) for a in sorted(set(link.overlay_addresses)))
    return [
        Rule(
            Verdict.DROP,
            TAG_OVERLAY_GUARD,
            iifnames=allowed,
            iifnames_negate=True,
            family=Family.IPV6,
            daddr=nets,
        )
    ]


def build_ruleset(policy: FirewallPolicy, link: LinkState) -> Ruleset:
    block = policy.default_action is DefaultAction.BLOCK
    trusted = link.trusted_interfaces
    wg_ports = tuple(PortRange(p, p) for p in sorted(set(link.wireguard_ports)))

    # First, whatever the policy: the overlay addresses answer only on the overlay links. A
    # neighbour on the underlay that routes our overlay /128 via our underlay address must not
    # reach the maintenance API (docs/security.md, "Overlay-only services").
    guard = overlay_guard(link)
    ingress: list[Rule] = [
        *guard,
        Rule(Verdict.ACCEPT, TAG_TRUSTED, iifnames=trusted),
        Rule(
            Verdict.ACCEPT,
            "gatekeeper: established connections",
            ct_states=("established", "related"),
        ),
        Rule(Verdict.DROP, "gatekeeper: invalid packets", ct_states=("invalid",)),
        # Before the rate limit and before any document rule that might drop ICMPv6.
        Rule(
            Verdict.ACCEPT,
            "gatekeeper: IPv6 neighbour discovery",
            l4proto="ipv6-icmp",
            icmpv6_types=ND_TYPES,
        ),
    ]
    if wg_ports:
        ingress.append(Rule(Verdict.ACCEPT, TAG_WIREGUARD, l4proto="udp", dports=wg_ports))
    if block:
        ingress += [
            Rule(
                Verdict.DROP,
                "gatekeeper: ICMP timestamp and address mask",
                l4proto="icmp",
                icmp_types=ICMP_DROP_TYPES,
            ),
            Rule(
                Verdict.ACCEPT,
                "gatekeeper: ICMP rate limit",
                l4proto="icmp",
                limit=(ICMP_RATE_PER_SECOND, ICMP_BURST),
            ),
            Rule(
                Verdict.ACCEPT,
                "gatekeeper: ICMPv6 rate limit",
                l4proto="ipv6-icmp",
                limit=(ICMP_RATE_PER_SECOND, ICMP_BURST),
            ),
        ]
    document_rules = _document_rules(policy)
    ingress += document_rules

    prerouting: list[Rule] = [
        Rule(Verdict.ACCEPT, TAG_TRUSTED, iifnames=trusted),
        # Traffic not addressed to this machine (forwarded, pods) is not ours to judge.
        Rule(Verdict.ACCEPT, "gatekeeper: not addressed to this machine", fib_daddr_not_local=True),
    ]
    if wg_ports:
        prerouting.append(
            Rule(Verdict.ACCEPT, TAG_WIREGUARD, ct_states=("new",), l4proto="udp", dports=wg_ports)
        )
    # Talos judges only new connections here; the input chain sees the rest.
    prerouting += [replace(r, ct_states=("new",)) for r in document_rules]
    if block:
        prerouting += [
            Rule(Verdict.DROP, "gatekeeper: new TCP", ct_states=("new",), l4proto="tcp"),
            Rule(Verdict.DROP, "gatekeeper: new UDP", ct_states=("new",), l4proto="udp"),
        ]

    return Ruleset(
        chains=(
            Chain(
                INGRESS_CHAIN,
                "input",
                INGRESS_PRIORITY,
                Verdict.DROP if block else Verdict.ACCEPT,
                tuple(ingress),
            ),
            Chain(
                PREROUTING_CHAIN,
                "prerouting",
                PREROUTING_PRIORITY,
                Verdict.ACCEPT,
                tuple(prerouting),
            ),
        )
    )
