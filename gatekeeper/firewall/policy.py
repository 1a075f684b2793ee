"""The firewall policy as the documents state it, and the link facts it is rendered against.

Pure values: the documents parser builds them, the ruleset builder and the explainer read them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The overlay interfaces: `siderolink` carries WireGuard over UDP, `siderolinktun` over the gRPC
# tunnel. Talos trusts only the first; traffic on either is the management overlay itself.
OVERLAY_INTERFACES: tuple[str, ...] = ("siderolink", "siderolinktun")
LOOPBACK = "lo"


class DefaultAction(StrEnum):
    ACCEPT = "accept"
    BLOCK = "block"


class Protocol(StrEnum):
    ICMP = "icmp"
    TCP = "tcp"
    UDP = "udp"
    ICMPV6 = "icmpv6"

    @property
    def has_ports(self) -> bool:
        return self in (Protocol.TCP, Protocol.UDP)


@dataclass(frozen=True, order=True)
class PortRange:
    lo: int
    hi: int

    def __str__(self) -> str:
        return f"{self.lo}-{self.hi}"

    def contains(self, port: int) -> bool:
        return self.lo <= port <= self.hi

    def short(self) -> str:
        return str(self.lo) if self.lo == self.hi else str(self)


@dataclass(frozen=True)
class IngressRule:
    subnet: Network
    except_: Network | None = None


@dataclass(frozen=True)
class NetworkRule:
    """One NetworkRuleConfig document, validated."""

    name: str
    ports: tuple[PortRange, ...]
    protocol: Protocol
    ingress: tuple[IngressRule, ...] = ()
    origin: str = ""  # "file: document N", for messages

    @property
    def subnets(self) -> tuple[Network, ...]:
        return tuple(r.subnet for r in self.ingress)

    @property
    def excepts(self) -> tuple[Network, ...]:
        # As in Talos, every `except` is carved out of the union of all the rule's subnets.
        return tuple(r.except_ for r in self.ingress if r.except_ is not None)


@dataclass(frozen=True)
class FirewallPolicy:
    default_action: DefaultAction = DefaultAction.ACCEPT
    rules: tuple[NetworkRule, ...] = ()


@dataclass(frozen=True)
class LinkState:
    """What the agent knows about the overlay that the firewall must keep open."""

    overlay_interfaces: tuple[str, ...] = OVERLAY_INTERFACES
    wireguard_ports: tuple[int, ...] = ()
    extra_trusted: tuple[str, ...] = field(default=())
    # The machine's own overlay addresses. Linux accepts a packet for a local address on any
    # interface (weak host model), so these are guarded: reachable from the overlay links only.
    overlay_addresses: tuple[ipaddress.IPv6Address, ...] = ()

    @property
    def trusted_interfaces(self) -> tuple[str, ...]:
        names = [LOOPBACK, *OVERLAY_INTERFACES, *self.overlay_interfaces, *self.extra_trusted]
        return tuple(dict.fromkeys(names))
