"""Link plumbing over rtnetlink (pyroute2), shared by every WireGuard backend.

Everything acts on the network namespace of the calling thread: the product runs inside its
namespace (`ip netns exec`), and tests enter one per thread with setns.

pyroute2's synchronous IPRoute drives an asyncio loop of its own and fails inside a running
loop, so calls made from an event-loop thread are carried out on a short-lived helper thread
(which inherits the caller's network namespace).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from gatekeeper.wireguard.backend import IPInterface, WireGuardError

T = TypeVar("T")
_IFF_UP = 0x1
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


def off_loop(fn: Callable[[], T]) -> T:
    """Run `fn` here, or on a helper thread when this thread runs an asyncio loop.

    pyroute2 refuses to run inside a thread whose asyncio loop is running; the helper thread
    only sidesteps that: the caller still waits for `fn`, so keep it short.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed back to the caller below
            failure.append(exc)

    thread = threading.Thread(target=target, name="gatekeeper-rtnetlink")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _netlink(what: str, fn: Callable[[Any], T]) -> T:
    def call() -> T:
        try:
            with IPRoute() as ipr:
                return fn(ipr)
        except NetlinkError as exc:
            raise WireGuardError(f"{what}: {os.strerror(exc.code)}{_hint(exc.code)}") from None

    return off_loop(call)


def _hint(code: int) -> str:
    if code == errno.EPERM:
        return " (needs CAP_NET_ADMIN: run as root or grant it)"
    return ""


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _require(ipr: Any, ifname: str) -> int:
    index = _index(ipr, ifname)
    if index is None:
        raise WireGuardError(f"interface {ifname} does not exist in this network namespace")
    return index


def _addresses(ipr: Any, index: int) -> tuple[IPInterface, ...]:
    found = []
    for msg in ipr.get_addr(index=index):
        # On point-to-point IPv4 links IFA_ADDRESS is the far end; IFA_LOCAL is ours.
        local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        found.append(ipaddress.ip_interface(f"{local}/{msg['prefixlen']}"))
    return tuple(found)


def link_info(ifname: str) -> LinkInfo | None:
    """The link's kind, MTU, state and addresses; None when it does not exist."""

    def read(ipr: Any) -> LinkInfo | None:
        index = _index(ipr, ifname)
        if index is None:
            return None
        (link,) = ipr.get_links(index)
        return LinkInfo(
            name=ifname,
            index=index,
            kind=link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "",
            mtu=int(link.get("IFLA_MTU")),
            up=bool(link["flags"] & _IFF_UP),
            addresses=_addresses(ipr, index),
        )

    return _netlink(f"reading interface {ifname}", read)


def link_exists(ifname: str) -> bool:
    return _netlink(f"looking up interface {ifname}", lambda ipr: _index(ipr, ifname) is not None)


def set_mtu(ifname: str, mtu: int) -> None:
    _netlink(
        f"setting MTU {mtu} on {ifname}",
        lambda ipr: ipr.link("set", index=_require(ipr, ifname), mtu=mtu),
    )


def set_up(ifname: str) -> None:
    _netlink(
        f"bringing {ifname} up",
        lambda ipr: ipr.link("set", index=_require(ipr, ifname), state="up"),
    )


def delete_link(ifname: str) -> bool:
    """Delete the link; False when there was none."""

    def delete(ipr: Any) -> bool:
        index = _index(ipr, ifname)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
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

    def apply(ipr: Any) -> None:
        index = _require(ipr, ifname)
        current = _addresses(ipr, index)
        for address in current:
            if address in wanted:
                continue
            if address.version == 6 and address.ip in _LINK_LOCAL:
                continue
            ipr.addr(
                "del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )
        for address in wanted:
            if address in current:
                continue
            flags = IFA_F_NODAD if address.version == 6 else 0
            ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                flags=flags,
            )

    _netlink(f"setting the addresses of {ifname}", apply)
