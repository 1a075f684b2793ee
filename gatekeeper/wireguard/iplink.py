"""Link plumbing over rtnetlink, shared by every WireGuard backend.

Everything acts on the network namespace of the calling thread: the product runs inside its
namespace (`ip netns exec`), and tests enter one per thread with setns.

The requests go through `rtnl` (the standard library's socket), not pyroute2: importing
pyroute2 costs the agent about 25 MB and, under emulation, seconds, and wireguard-go needs
none of it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gatekeeper.wireguard import rtnl
from gatekeeper.wireguard.backend import IPInterface, WireGuardError

T = TypeVar("T")
_LINK_LOCAL = ipaddress.IPv6Network("fe80::/10")


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    # rtnetlink's kind ("tun", "wireguard", "veth"...), "" when the link reports none.
    kind: str
    mtu: int
    # Administratively up (IFF_UP), whatever the carrier says.
    up: bool
    addresses: tuple[IPInterface, ...]


def _netlink(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except OSError as exc:  # the kernel's refusal (NetlinkError), or the socket's own failure
        code = exc.errno or errno.EIO
        raise WireGuardError(f"{what}: {os.strerror(code)}{_hint(code)}") from None


def _hint(code: int) -> str:
    if code == errno.EPERM:
        return " (needs CAP_NET_ADMIN: run as root or grant it)"
    return ""


def _require(ifname: str) -> rtnl.Link:
    link = rtnl.get_link(ifname)
    if link is None:
        raise WireGuardError(f"interface {ifname} does not exist in this network namespace")
    return link


def _addresses(index: int) -> tuple[IPInterface, ...]:
    return tuple(found.interface for found in rtnl.addresses(index))


def link_info(ifname: str) -> LinkInfo | None:
    """The link's kind, MTU, state and addresses; None when it does not exist."""

    def read() -> LinkInfo | None:
        link = rtnl.get_link(ifname)
        if link is None:
            return None
        return LinkInfo(
            name=ifname,
            index=link.index,
            kind=link.kind,
            mtu=link.mtu,
            up=bool(link.flags & rtnl.IFF_UP),
            addresses=_addresses(link.index),
        )

    return _netlink(f"reading interface {ifname}", read)


def link_exists(ifname: str) -> bool:
    return _netlink(f"looking up interface {ifname}", lambda: rtnl.get_link(ifname) is not None)


def set_mtu(ifname: str, mtu: int) -> None:
    _netlink(
        f"setting MTU {mtu} on {ifname}",
        lambda: rtnl.set_link(_require(ifname).index, mtu=mtu),
    )


def set_up(ifname: str) -> None:
    _netlink(f"bringing {ifname} up", lambda: rtnl.set_link(_require(ifname).index, up=True))


def create_link(ifname: str, kind: str) -> int:
    """Create a link of `kind`; its index. EEXIST and EOPNOTSUPP come back as NetlinkError."""
    rtnl.add_link(ifname, kind)
    link = rtnl.get_link(ifname)
    if link is None:
        raise WireGuardError(f"created {ifname} but it vanished at once")
    return link.index


def delete_link(ifname: str) -> bool:
    """Delete the link; False when there was none."""

    def delete() -> bool:
        link = rtnl.get_link(ifname)
        if link is None:
            return False
        try:
            rtnl.delete_link(link.index)
        except rtnl.NetlinkError as exc:
            if exc.code == errno.ENODEV:  # gone meanwhile (its owner exited)
                return False
            raise
        return True

    return _netlink(f"deleting interface {ifname}", delete)


def set_addresses(ifname: str, addresses: Sequence[IPInterface]) -> None:
    """Make `addresses` the link's addresses, besides any kernel IPv6 link-local one.

    IPv6 addresses skip duplicate-address detection (IFA_F_NODAD): the link is point-to-point
    and DAD would hold the address back for a second or more.
    """
    wanted = []
    for address in addresses:
        if not isinstance(address, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
            raise WireGuardError(
                f"address {address!r} for {ifname} is not an ipaddress interface (address/prefix)"
            )
        wanted.append(address)

    def apply() -> None:
        index = _require(ifname).index
        current = _addresses(index)
        for address in current:
            if address in wanted:
                continue
            if address.version == 6 and address.ip in _LINK_LOCAL:
                continue
            rtnl.delete_address(index, address)
        for address in wanted:
            if address in current:
                continue
            rtnl.add_address(index, address, nodad=address.version == 6)

    _netlink(f"setting the addresses of {ifname}", apply)
