"""Where the maintenance API listens: the rule, as values the agent hands to the service.

- SideroLink configured, no overlay address yet: NotListening.
- SideroLink configured, address known: ListenOn(that address) and nothing else.
- No SideroLink: ListenAll (every address), as Talos's maintenance mode does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gatekeeper.maintenance.policy import IPAddress

DEFAULT_PORT = 50000


@dataclass(frozen=True)
class NotListening:
    """No socket at all."""


@dataclass(frozen=True)
class ListenAll:
    """The wildcard address (dual-stack where the host has IPv6)."""


@dataclass(frozen=True)
class ListenOn:
    """Exactly one unicast address; never a wildcard."""

    address: IPAddress

    def __init__(self, address: IPAddress | str) -> None:
        try:
            addr = ipaddress.ip_address(str(address).strip("[]").split("%", 1)[0])
        except ValueError:
            raise ValueError(f"listen address {address!r} is not an IP address") from None
        if addr.is_unspecified or addr.is_multicast:
            raise ValueError(f"listen address {addr} must be one unicast address, not {address!r}")
        object.__setattr__(self, "address", addr)

    def hostport(self, port: int) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{port}"


BindTarget = NotListening | ListenAll | ListenOn


def bind_target(
    *, siderolink_configured: bool, siderolink_address: str | IPAddress | None
) -> BindTarget:
    """The target for the machine's current SideroLink state (addresses may carry a /len)."""
    if not siderolink_configured:
        return ListenAll()
    if siderolink_address is None or str(siderolink_address) == "":
        return NotListening()
    return ListenOn(str(siderolink_address).split("/", 1)[0])
