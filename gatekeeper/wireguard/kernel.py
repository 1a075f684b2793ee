"""The kernel backend: the `wireguard` link kind, configured over generic netlink.

This is what Talos does with wgctrl: rtnetlink (`rtnl`) creates the link, WireGuard's generic
netlink family sets the key, port and peers and reads back handshakes and counters, and iplink
sets addresses and MTU. The family's messages are encoded here on `rtnl`'s primitives: pyroute2
would cost the agent ~25 MB and, under emulation, seconds of import before the link exists.
Nothing runs beside us: the kernel owns the device, so close() only deletes the link.

The message building and parsing are pure functions (`set_messages`, `parse_device`); the
device class is a thin adapter that sends them.

Every request names the device by interface index, not by name: a handle whose link was taken
over by a newer device (same name, new index) then fails instead of changing the new one.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

from gatekeeper.netaddr import HostPortError, split_host_port
from gatekeeper.wireguard import iplink, rtnl
from gatekeeper.wireguard.backend import (
    MAX_MTU,
    MIN_MTU,
    IPInterface,
    IPNetwork,
    PeerConfig,
    PeerStats,
    WireGuardError,
    check_ifname,
)
from gatekeeper.wireguard.keys import PrivateKey, PublicKey

log = logging.getLogger(__name__)

T = TypeVar("T")
LINK_KIND = "wireguard"

# WireGuard's generic netlink family, as the kernel's include/uapi/linux/wireguard.h defines it.
WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1

WGDEVICE_A_IFINDEX = 1
WGDEVICE_A_IFNAME = 2
WGDEVICE_A_PRIVATE_KEY = 3
WGDEVICE_A_PUBLIC_KEY = 4
WGDEVICE_A_FLAGS = 5
WGDEVICE_A_LISTEN_PORT = 6
WGDEVICE_A_FWMARK = 7
WGDEVICE_A_PEERS = 8
WGDEVICE_F_REPLACE_PEERS = 1

WGPEER_A_PUBLIC_KEY = 1
WGPEER_A_PRESHARED_KEY = 2
WGPEER_A_FLAGS = 3
WGPEER_A_ENDPOINT = 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
WGPEER_A_LAST_HANDSHAKE_TIME = 6
WGPEER_A_RX_BYTES = 7
WGPEER_A_TX_BYTES = 8
WGPEER_A_ALLOWEDIPS = 9
WGPEER_A_PROTOCOL_VERSION = 10
WGPEER_F_REMOVE_ME = 1
WGPEER_F_REPLACE_ALLOWEDIPS = 2
WGPEER_F_UPDATE_ONLY = 4

WGALLOWEDIP_A_FAMILY = 1
WGALLOWEDIP_A_IPADDR = 2
WGALLOWEDIP_A_CIDR_MASK = 3

NLA_F_NESTED = 0x8000
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300

_GENL = struct.Struct("=BBH")  # genlmsghdr: command, version, reserved
_U8 = struct.Struct("=B")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_TIMESPEC = struct.Struct("=qq")  # struct __kernel_timespec: seconds, nanoseconds
# struct sockaddr_in / sockaddr_in6: the family in host order, the port in network order.
_SOCKADDR_IN = struct.Struct("=H2s4s8x")
_SOCKADDR_IN6 = struct.Struct("=H2s4s16sI")

# A nested netlink attribute carries a 16-bit length, so the peer list of one message must
# stay well under 64 KiB; larger sets go out in several messages (as wgctrl does).
MESSAGE_BUDGET = 32 * 1024
_PEER_OVERHEAD = 96  # key, flags, endpoint, keepalive, nest headers
_ALLOWED_IP_SIZE = 40  # family, address, mask, nest header (IPv6; IPv4 is smaller)


def _nest(kind: int, body: bytes) -> bytes:
    return rtnl.attr(kind | NLA_F_NESTED, body)


def _genl_header(command: int) -> bytes:
    return _GENL.pack(command, WG_GENL_VERSION, 0)


# --- pure: building requests ---------------------------------------------------------------


@dataclass(frozen=True)
class _PeerPart:
    """One peer's attributes in one message (a peer with very many allowed IPs spans several)."""

    config: PeerConfig
    allowed_ips: tuple[IPNetwork, ...]
    first: bool
    remove: bool = False

    def size(self) -> int:
        return _PEER_OVERHEAD + _ALLOWED_IP_SIZE * len(self.allowed_ips)


def _split_endpoint(endpoint: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    # The one host:port rule (gatekeeper.netaddr): `fd00::1:8090` is refused, as by the UAPI.
    try:
        host, number = split_host_port(endpoint, "peer endpoint")
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        why = exc.reason if isinstance(exc, HostPortError) else f"{host!r} is not an IP address"
        raise WireGuardError(
            f"peer endpoint {endpoint[:80]!r} is not an IP literal with a port: {why}"
        ) from None
    return address, number


def encode_endpoint(endpoint: str) -> bytes:
    """`host:port` / `[v6]:port` as the struct sockaddr WGPEER_A_ENDPOINT carries."""
    address, port = _split_endpoint(endpoint)
    net_port = port.to_bytes(2, "big")
    if address.version == 6:
        return _SOCKADDR_IN6.pack(socket.AF_INET6, net_port, b"\0" * 4, address.packed, 0)
    return _SOCKADDR_IN.pack(socket.AF_INET, net_port, address.packed)


def _allowed_ip_attr(net: IPNetwork) -> bytes:
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    return _nest(
        0,
        rtnl.attr(WGALLOWEDIP_A_FAMILY, _U16.pack(family))
        + rtnl.attr(WGALLOWEDIP_A_IPADDR, net.network_address.packed)
        + rtnl.attr(WGALLOWEDIP_A_CIDR_MASK, _U8.pack(net.prefixlen)),
    )


def _peer_attr(part: _PeerPart) -> bytes:
    peer = part.config
    body = rtnl.attr(WGPEER_A_PUBLIC_KEY, peer.public_key.raw)
    if part.remove:
        return _nest(0, body + rtnl.attr(WGPEER_A_FLAGS, _U32.pack(WGPEER_F_REMOVE_ME)))
    only = WGPEER_F_UPDATE_ONLY if peer.update_only else 0
    if part.first:
        # The Device contract: set_peer replaces allowed IPs and keepalive; a missing endpoint
        # keeps whatever the peer had (or learned from its packets).
        body += rtnl.attr(WGPEER_A_FLAGS, _U32.pack(WGPEER_F_REPLACE_ALLOWEDIPS | only))
        if peer.endpoint is not None:
            body += rtnl.attr(WGPEER_A_ENDPOINT, encode_endpoint(peer.endpoint))
        keepalive = peer.persistent_keepalive or 0
        body += rtnl.attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, _U16.pack(keepalive))
    elif only:
        body += rtnl.attr(WGPEER_A_FLAGS, _U32.pack(only))
    if part.allowed_ips or part.first:
        allowed = b"".join(_allowed_ip_attr(net) for net in part.allowed_ips)
        body += _nest(WGPEER_A_ALLOWEDIPS, allowed)
    return _nest(0, body)


def _parts(peers: Iterable[PeerConfig], budget: int) -> list[_PeerPart]:
    per_part = max(1, (budget - _PEER_OVERHEAD) // _ALLOWED_IP_SIZE)
    parts = []
    for peer in peers:
        ips = peer.allowed_ips
        parts.append(_PeerPart(peer, ips[:per_part], first=True))
        for start in range(per_part, len(ips), per_part):
            parts.append(_PeerPart(peer, ips[start : start + per_part], first=False))
    return parts


def set_messages(
    ifindex: int,
    *,
    private_key: PrivateKey | None = None,
    listen_port: int | None = None,
    replace_peers: bool = False,
    peers: Sequence[PeerConfig] = (),
    remove: Sequence[PublicKey] = (),
    budget: int = MESSAGE_BUDGET,
) -> list[bytes]:
    """The WG_CMD_SET_DEVICE payloads (generic netlink header and attributes) for this change.

    The device settings and the replace-peers flag go in the first message only, so a peer
    list split over several messages is replaced once and then added to.
    """
    parts = _parts(peers, budget)
    parts += [_PeerPart(PeerConfig(key, ()), (), first=True, remove=True) for key in remove]
    messages: list[bytes] = []
    batch: list[_PeerPart] = []
    used = 0

    def flush(first: bool) -> None:
        msg = _genl_header(WG_CMD_SET_DEVICE) + rtnl.attr(WGDEVICE_A_IFINDEX, _U32.pack(ifindex))
        if first:
            if private_key is not None:
                msg += rtnl.attr(WGDEVICE_A_PRIVATE_KEY, private_key.raw)
            if listen_port is not None:
                msg += rtnl.attr(WGDEVICE_A_LISTEN_PORT, _U16.pack(listen_port))
            if replace_peers:
                msg += rtnl.attr(WGDEVICE_A_FLAGS, _U32.pack(WGDEVICE_F_REPLACE_PEERS))
        if batch:
            msg += _nest(WGDEVICE_A_PEERS, b"".join(_peer_attr(p) for p in batch))
        messages.append(msg)

    for part in parts:
        if batch and used + part.size() > budget:
            flush(not messages)
            batch, used = [], 0
        batch.append(part)
        used += part.size()
    if batch or not messages:
        flush(not messages)
    return messages


def get_message(ifindex: int) -> bytes:
    """The WG_CMD_GET_DEVICE payload; it is sent as a dump (NLM_F_DUMP)."""
    return _genl_header(WG_CMD_GET_DEVICE) + rtnl.attr(WGDEVICE_A_IFINDEX, _U32.pack(ifindex))


# --- pure: reading replies -----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceDump:
    listen_port: int
    peers: tuple[PeerStats, ...]


def decode_endpoint(value: bytes) -> str | None:
    """A WGPEER_A_ENDPOINT sockaddr as `host:port` / `[v6]:port`; None for an unset one."""
    if len(value) >= _SOCKADDR_IN6.size:
        family, port, _flow, raw6, _scope = _SOCKADDR_IN6.unpack_from(value)
        if family == socket.AF_INET6:
            return f"[{ipaddress.IPv6Address(raw6)}]:{int.from_bytes(port, 'big')}"
    if len(value) >= _SOCKADDR_IN.size:
        family, port, raw4 = _SOCKADDR_IN.unpack_from(value)
        if family == socket.AF_INET:
            return f"{ipaddress.IPv4Address(raw4)}:{int.from_bytes(port, 'big')}"
    return None


def _allowed_ip(body: bytes) -> IPNetwork | None:
    values = dict(rtnl.attrs(body))
    family = _U16.unpack(values[WGALLOWEDIP_A_FAMILY])[0] if WGALLOWEDIP_A_FAMILY in values else 0
    raw = values.get(WGALLOWEDIP_A_IPADDR, b"")
    mask = values.get(WGALLOWEDIP_A_CIDR_MASK, b"")
    if not mask:
        return None
    if family == socket.AF_INET6 and len(raw) == 16:
        return ipaddress.IPv6Network((raw, mask[0]), strict=False)
    if family == socket.AF_INET and len(raw) == 4:
        return ipaddress.IPv4Network((raw, mask[0]), strict=False)
    return None


@dataclass
class _PeerFields:
    endpoint: str | None = None
    handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0
    allowed: list[IPNetwork] = field(default_factory=list)


def _read_peer(body: bytes, fields: dict[bytes, _PeerFields]) -> None:
    values: dict[int, bytes] = {}
    allowed: list[IPNetwork] = []
    for kind, value in rtnl.attrs(body):
        if kind == WGPEER_A_ALLOWEDIPS:
            allowed.extend(ip for _, entry in rtnl.attrs(value) if (ip := _allowed_ip(entry)))
        else:
            values[kind] = value
    key = values.get(WGPEER_A_PUBLIC_KEY)
    if key is None or len(key) != 32:
        return  # the kernel names every peer by its key; a malformed entry is not one
    entry = fields.setdefault(key, _PeerFields())
    entry.allowed.extend(allowed)
    if (raw := values.get(WGPEER_A_ENDPOINT)) is not None:
        entry.endpoint = decode_endpoint(raw)
    if (raw := values.get(WGPEER_A_LAST_HANDSHAKE_TIME)) is not None and len(raw) >= 16:
        seconds, nanoseconds = _TIMESPEC.unpack_from(raw)
        entry.handshake = seconds + nanoseconds / 1e9 if seconds or nanoseconds else None
    if (raw := values.get(WGPEER_A_RX_BYTES)) is not None and len(raw) >= 8:
        entry.rx_bytes = _U64.unpack_from(raw)[0]
    if (raw := values.get(WGPEER_A_TX_BYTES)) is not None and len(raw) >= 8:
        entry.tx_bytes = _U64.unpack_from(raw)[0]
    if (raw := values.get(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL)) is not None and len(raw) >= 2:
        entry.keepalive = _U16.unpack_from(raw)[0]


def parse_device(messages: Iterable[bytes]) -> DeviceDump:
    """Merge a WG_CMD_GET_DEVICE dump (each message's generic netlink header and attributes):
    the kernel may continue one peer (its allowed IPs) in the next message, so peers are
    gathered by public key in order of appearance."""
    listen_port = 0
    fields: dict[bytes, _PeerFields] = {}  # dicts keep insertion order: the kernel's order
    for msg in messages:
        for kind, value in rtnl.attrs(msg[_GENL.size :]):
            if kind == WGDEVICE_A_LISTEN_PORT and len(value) >= 2:
                listen_port = _U16.unpack_from(value)[0]
            elif kind == WGDEVICE_A_PEERS:
                for _, peer in rtnl.attrs(value):
                    _read_peer(peer, fields)
    peers = tuple(
        PeerStats(
            public_key=PublicKey(key),
            endpoint=entry.endpoint,
            last_handshake=entry.handshake,
            rx_bytes=entry.rx_bytes,
            tx_bytes=entry.tx_bytes,
            allowed_ips=tuple(entry.allowed),
            persistent_keepalive=entry.keepalive or None,
        )
        for key, entry in fields.items()
    )
    return DeviceDump(listen_port=listen_port, peers=peers)


# --- I/O -----------------------------------------------------------------------------------


def _hint(code: int) -> str:
    if code == errno.EPERM:
        return " (needs CAP_NET_ADMIN: run as root or grant it)"
    if code == errno.ENODEV:
        return " (the link is gone: deleted, or taken over by a newer device of that name)"
    return ""


def _failure(what: str, exc: rtnl.NetlinkError) -> WireGuardError:
    return WireGuardError(f"{what}: {os.strerror(exc.code)}{_hint(exc.code)}")


def _family_id(what: str) -> int:
    """WireGuard's generic netlink family id, errors as one-line WireGuardError."""
    try:
        return rtnl.genl_family_id(WG_GENL_NAME)
    except rtnl.NetlinkError as exc:
        if exc.code == errno.ENOENT:
            raise WireGuardError(
                f"{what}: this kernel has no WireGuard (generic netlink family 'wireguard' "
                "missing): load the wireguard module or use the userspace backend"
            ) from None
        raise _failure(what, exc) from None


# What a request to a family id that is no longer WireGuard's gets: nothing there (ENOENT),
# or another family that took the id and does not know the command (EINVAL, EOPNOTSUPP).
_STALE_FAMILY = (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP)


class KernelDevice:
    """A kernel WireGuard link owned by this process."""

    def __init__(self, ifname: str, ifindex: int) -> None:
        self._name = ifname
        self.ifindex = ifindex
        self._closed = False
        # Looked up once: the id stays WireGuard's while the module is loaded (a link of
        # this kind exists, so it is), and every sample would otherwise cost a round trip.
        self._family: int | None = None

    def _genl(self, what: str, fn: Callable[[int], T]) -> T:
        """Run fn with WireGuard's generic netlink family id; errors as WireGuardError.

        The kernel answers these requests synchronously, so no helper thread is needed. If
        the cached id has gone stale (the module reloaded) the id is looked up again and fn
        retried once; an error with the id unchanged is the request's own.
        """
        family = self._family if self._family is not None else _family_id(what)
        self._family = family
        try:
            return fn(family)
        except rtnl.NetlinkError as exc:
            if exc.code not in _STALE_FAMILY:
                raise _failure(what, exc) from None
            error = exc
        fresh = _family_id(what)
        if fresh == family:
            raise _failure(what, error) from None
        self._family = fresh
        log.info("WireGuard's generic netlink family moved (%d -> %d)", family, fresh)
        try:
            return fn(fresh)
        except rtnl.NetlinkError as exc:
            raise _failure(what, exc) from None

    @property
    def name(self) -> str:
        return self._name

    def _send(self, what: str, messages: Sequence[bytes]) -> None:
        if self._closed:
            raise WireGuardError(f"cannot {what}: {self._name} is closed")

        def send(family: int) -> None:
            for msg in messages:
                rtnl.request(rtnl.NETLINK_GENERIC, family, NLM_F_ACK, msg)

        self._genl(what, send)

    def dump(self) -> DeviceDump:
        if self._closed:
            raise WireGuardError(f"cannot read {self._name}: it is closed")
        return self._genl(
            f"read {self._name}",
            lambda family: parse_device(
                body
                for _kind, body in rtnl.request(
                    rtnl.NETLINK_GENERIC, family, NLM_F_DUMP, get_message(self.ifindex)
                )
            ),
        )

    def configure(
        self,
        private_key: PrivateKey,
        listen_port: int | None,
        peers: Sequence[PeerConfig],
        *,
        replace_peers: bool = True,
    ) -> None:
        """listen_port None keeps the current port (a random one on a fresh device)."""
        port = "" if listen_port is None else f" (listen port {listen_port})"
        self._send(
            f"configure {self._name}{port}",
            set_messages(
                self.ifindex,
                private_key=private_key,
                listen_port=listen_port,
                replace_peers=replace_peers,
                peers=peers,
            ),
        )

    def set_peer(self, peer: PeerConfig) -> None:
        self._send(
            f"set peer {peer.public_key.fingerprint()} on {self._name}",
            set_messages(self.ifindex, peers=[peer]),
        )

    def set_peers(self, peers: Sequence[PeerConfig]) -> None:
        if peers:
            self._send(
                f"set {len(peers)} peers on {self._name}", set_messages(self.ifindex, peers=peers)
            )

    def remove_peer(self, public_key: PublicKey) -> None:
        # The kernel ignores the removal of a peer it does not have.
        self._send(
            f"remove peer {public_key.fingerprint()} from {self._name}",
            set_messages(self.ifindex, remove=[public_key]),
        )

    def peers(self) -> list[PeerStats]:
        return list(self.dump().peers)

    def last_handshakes(self) -> list[float | None]:
        return [p.last_handshake for p in self.dump().peers]

    def listen_port(self) -> int:
        return self.dump().listen_port

    def set_addresses(self, addresses: Sequence[IPInterface]) -> None:
        iplink.set_addresses(self._name, addresses)
        iplink.set_up(self._name)

    def failure(self) -> str | None:
        if self._closed:
            return f"{self._name} is closed"
        info = iplink.link_info(self._name)
        if info is None or info.index != self.ifindex:
            return f"the link {self._name} was deleted"
        return None

    def close(self) -> None:
        """Delete the link while it is still ours; safe to repeat."""
        if self._closed:
            return
        self._closed = True
        info = iplink.link_info(self._name)
        if info is not None and info.index == self.ifindex:
            iplink.delete_link(self._name)

    def __enter__(self) -> KernelDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KernelDevice({self._name!r}, ifindex={self.ifindex})"


class KernelBackend:
    """Creates kernel WireGuard links in the current network namespace."""

    name = "kernel"

    def create(self, ifname: str, *, mtu: int = 1280) -> KernelDevice:
        check_ifname(ifname)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
            raise WireGuardError(f"MTU {mtu!r} for {ifname}: must be {MIN_MTU}..{MAX_MTU}")
        _take_over(ifname)

        try:
            ifindex = iplink.create_link(ifname, LINK_KIND)
        except rtnl.NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP:
                raise WireGuardError(
                    f"cannot create {ifname}: this kernel has no WireGuard link type "
                    "(load the wireguard module or use the userspace backend)"
                ) from None
            what = f"creating WireGuard interface {ifname}"
            raise WireGuardError(f"{what}: {os.strerror(exc.code)}{_hint(exc.code)}") from None
        device = KernelDevice(ifname, ifindex)
        try:
            iplink.set_mtu(ifname, mtu)
            # The kernel binds the UDP port only while the link is up: up from the start, a
            # port clash shows in configure() (as with wireguard-go) instead of much later.
            iplink.set_up(ifname)
        except BaseException:
            device.close()
            raise
        log.info("kernel WireGuard interface %s created (ifindex %d)", ifname, ifindex)
        return device


def _take_over(ifname: str) -> None:
    """Delete a WireGuard link of this name left by an earlier run; refuse any other kind."""
    info = iplink.link_info(ifname)
    if info is None:
        return
    if info.kind not in (LINK_KIND, "tun"):
        raise WireGuardError(
            f"interface {ifname} already exists as a {info.kind or 'non-WireGuard'} link: "
            "refusing to delete it; choose another interface name"
        )
    log.warning("removing interface %s left by an earlier run", ifname)
    iplink.delete_link(ifname)
