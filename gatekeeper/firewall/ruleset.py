"""The desired ruleset: the policy and the link state turned into chains of typed rules.

This is the one place that decides what the firewall does; `render` turns it into nftables JSON
and `explain` evaluates packets against it, so the two cannot disagree. The shape follows
Talos's `inet talos` table (spec section 8) with two additions: both overlay interfaces are
trusted, and the WireGuard listen port is always admitted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from gatekeeper.firewall.policy import (
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
    ct_states: tuple[str, ...] = ()
    fib_daddr_not_local: bool = False
    family: Family | None = None
    saddr: tuple[Network, ...] = ()
    saddr_negate: bool = False
    l4proto: str | None = None
    dports: tuple[PortRange, ...] = ()
    icmp_types: tuple[str, ...] = ()
    icmpv6_types: tuple[str, ...] = ()
    limit: tuple[int, int] | None = None  # packets per second, burst


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
    return int(net.network_address), int(net.broadcast_address)


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


def _rule_variants(rule: NetworkRule, default: DefaultAction, new_only: bool) -> list[Rule]:
    """Talos's per-document rules: one per address family the rule can concern.

    Block mode: sources in the subnets (minus except) are accepted on the ports.
    Accept mode: sources outside them are dropped on the ports, so a family the rule names no
    subnet for is dropped as a whole on those ports.
    """
    block = default is DefaultAction.BLOCK
    verdict = Verdict.ACCEPT if block else Verdict.DROP
    l4 = L4PROTO[rule.protocol]
    dports = tuple(sorted(rule.ports)) if rule.protocol.has_ports else ()
    families = {
        Protocol.ICMP: (Family.IPV4,),
        Protocol.ICMPV6: (Family.IPV6,),
    }.get(rule.protocol, (Family.IPV4, Family.IPV6))
    states = ("new",) if new_only else ()
    # Comments are quoted by nft's listing; a quote inside would break the round trip.
    label = "".join(c if c.isprintable() and c != '"' else "?" for c in rule.name)
    out: list[Rule] = []
    for family in families:
        nets = source_networks(rule.subnets, rule.excepts, family)
        base = Rule(
            verdict,
            _comment(f"NetworkRuleConfig {label} ({family.label})"),
            ct_states=states,
            family=family,
            l4proto=l4,
            dports=dports,
        )
        if block:
            if not nets:
                continue  # nobody of this family is allowed: the drop policy decides
            out.append(replace(base, saddr=() if _is_everything(nets) else nets))
        else:
            if _is_everything(nets):
                continue  # everybody of this family is allowed: nothing to drop
            out.append(replace(base, saddr=nets, saddr_negate=bool(nets)))
    return out


def build_ruleset(policy: FirewallPolicy, link: LinkState) -> Ruleset:
    block = policy.default_action is DefaultAction.BLOCK
    trusted = link.trusted_interfaces
    wg_ports = tuple(PortRange(p, p) for p in sorted(set(link.wireguard_ports)))

    ingress: list[Rule] = [
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
    for rule in policy.rules:
        ingress += _rule_variants(rule, policy.default_action, new_only=False)

    prerouting: list[Rule] = [
        Rule(Verdict.ACCEPT, TAG_TRUSTED, iifnames=trusted),
        # Traffic not addressed to this machine (forwarded, pods) is not ours to judge.
        Rule(Verdict.ACCEPT, "gatekeeper: not addressed to this machine", fib_daddr_not_local=True),
    ]
    if wg_ports:
        prerouting.append(
            Rule(Verdict.ACCEPT, TAG_WIREGUARD, ct_states=("new",), l4proto="udp", dports=wg_ports)
        )
    for rule in policy.rules:
        prerouting += _rule_variants(rule, policy.default_action, new_only=True)
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
