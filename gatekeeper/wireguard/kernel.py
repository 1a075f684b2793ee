"""The kernel backend: the `wireguard` link kind, configured over generic netlink.

This is what Talos does with wgctrl: rtnetlink (`rtnl`) creates the link, WireGuard's generic
netlink family (through pyroute2's `WireGuard` socket) sets the key, port and peers and reads back
handshakes and counters, and iplink sets addresses and MTU. Nothing runs beside us: the kernel
owns the device, so close() only deletes the link.

The message building and parsing are pure functions (`set_messages`, `parse_device`); the
device class is a thin adapter that sends them.

Every request names the device by interface index, not by name: a handle whose link was taken
over by a newer device (same name, new index) then fails instead of changing the new one.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from pyroute2 import WireGuard
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGDEVICE_F_REPLACE_PEERS,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    wgmsg,
)

from gatekeeper.netaddr import HostPortError, split_host_port
from gatekeeper.wireguard import iplink, rtnl
from gatekeeper.wireguard.backend import (
    IPInterface,
    IPNetwork,
    PeerConfig,
    PeerStats,
    WireGuardError,
)
from gatekeeper.wireguard.keys import PrivateKey, PublicKey
from gatekeeper.wireguard.userspace import MAX_MTU, MIN_MTU, check_ifname

log = logging.getLogger(__name__)

T = TypeVar("T")
LINK_KIND = "wireguard"

# A nested netlink attribute carries a 16-bit length, so the peer list of one message must
# stay well under 64 KiB; larger sets go out in several messages (as wgctrl does).
MESSAGE_BUDGET = 32 * 1024
_PEER_OVERHEAD = 96  # key, flags, endpoint, keepalive, nest headers
_ALLOWED_IP_SIZE = 40  # family, address, mask, nest header (IPv6; IPv4 is smaller)


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


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    # The one host:port rule (gatekeeper.netaddr): `fd00::1:8090` is refused, as by the UAPI.
    try:
        host, number = split_host_port(endpoint, "peer endpoint")
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        why = exc.reason if isinstance(exc, HostPortError) else f"{host!r} is not an IP address"
        raise WireGuardError(
            f"peer endpoint {endpoint[:80]!r} is not an IP literal with a port: {why}"
        ) from None
    return str(address), number


def _peer_attrs(part: _PeerPart) -> dict[str, Any]:
    peer = part.config
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", peer.public_key.base64()]]
    if part.remove:
        attrs.append(["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME])
        return {"attrs": attrs}
    only = WGPEER_F_UPDATE_ONLY if peer.update_only else 0
    if part.first:
        # The Device contract: set_peer replaces allowed IPs and keepalive; a missing endpoint
        # keeps whatever the peer had (or learned from its packets).
        attrs.append(["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS | only])
        if peer.endpoint is not None:
            addr, port = _split_endpoint(peer.endpoint)
            attrs.append(["WGPEER_A_ENDPOINT", {"addr": addr, "port": port}])
        attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.persistent_keepalive or 0])
    elif only:
        attrs.append(["WGPEER_A_FLAGS", only])
    allowed = []
    for net in part.allowed_ips:
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        allowed.append(
            {
                "attrs": [
                    ["WGALLOWEDIP_A_FAMILY", family],
                    ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
                    ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen],
                ]
            }
        )
    if allowed or part.first:
        attrs.append(["WGPEER_A_ALLOWEDIPS", allowed])
    return {"attrs": attrs}


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
) -> list[wgmsg]:
    """The WG_CMD_SET_DEVICE messages that apply this change, in order.

    The device settings and the replace-peers flag go in the first message only, so a peer
    list split over several messages is replaced once and then added to.
    """
    parts = _parts(peers, budget)
    parts += [_PeerPart(PeerConfig(key, ()), (), first=True, remove=True) for key in remove]
    messages: list[wgmsg] = []
    batch: list[_PeerPart] = []
    used = 0

    def flush(first: bool) -> None:
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"].append(["WGDEVICE_A_IFINDEX", ifindex])
        if first:
            if private_key is not None:
                msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", private_key.base64()])
            if listen_port is not None:
                msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", listen_port])
            if replace_peers:
                msg["attrs"].append(["WGDEVICE_A_FLAGS", WGDEVICE_F_REPLACE_PEERS])
        if batch:
            msg["attrs"].append(["WGDEVICE_A_PEERS", [_peer_attrs(p) for p in batch]])
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


def get_message(ifindex: int) -> wgmsg:
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"].append(["WGDEVICE_A_IFINDEX", ifindex])
    return msg


# --- pure: reading replies -----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceDump:
    listen_port: int
    peers: tuple[PeerStats, ...]


def _key_bytes(value: Any) -> bytes:
    # pyroute2 decodes WireGuard keys to base64.
    return base64.b64decode(value)


def _allowed_ip(attr: Any) -> IPNetwork:
    family = attr.get_attr("WGALLOWEDIP_A_FAMILY")
    packed = bytes.fromhex(attr.get_attr("WGALLOWEDIP_A_IPADDR").replace(":", ""))
    mask = attr.get_attr("WGALLOWEDIP_A_CIDR_MASK")
    address = ipaddress.ip_address(packed[: 16 if family == socket.AF_INET6 else 4])
    return ipaddress.ip_network(f"{address}/{mask}", strict=False)


def _endpoint(attr: Any) -> str | None:
    if attr is None:
        return None
    addr = ipaddress.ip_address(attr["addr"])
    port = attr["port"]
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def parse_device(messages: Iterable[Any]) -> DeviceDump:
    """Merge a WG_CMD_GET_DEVICE dump: the kernel may continue one peer (its allowed IPs)
    in the next message, so peers are gathered by public key in order of appearance."""
    listen_port = 0
    order: list[bytes] = []
    fields: dict[bytes, dict[str, Any]] = {}
    for msg in messages:
        port = msg.get_attr("WGDEVICE_A_LISTEN_PORT")
        if port is not None:
            listen_port = int(port)
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = _key_bytes(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            if key not in fields:
                order.append(key)
                fields[key] = {"allowed": []}
            entry = fields[key]
            for name in (
                "WGPEER_A_ENDPOINT",
                "WGPEER_A_LAST_HANDSHAKE_TIME",
                "WGPEER_A_RX_BYTES",
                "WGPEER_A_TX_BYTES",
                "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL",
            ):
                value = peer.get_attr(name)
                if value is not None:
                    entry[name] = value
            entry["allowed"].extend(
                _allowed_ip(a) for a in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []
            )
    peers = []
    for key in order:
        entry = fields[key]
        handshake = entry.get("WGPEER_A_LAST_HANDSHAKE_TIME")
        when = None
        if handshake is not None and (handshake["tv_sec"] or handshake["tv_nsec"]):
            when = handshake["tv_sec"] + handshake["tv_nsec"] / 1e9
        keepalive = int(entry.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0)
        peers.append(
            PeerStats(
                public_key=PublicKey(key),
                endpoint=_endpoint(entry.get("WGPEER_A_ENDPOINT")),
                last_handshake=when,
                rx_bytes=int(entry.get("WGPEER_A_RX_BYTES") or 0),
                tx_bytes=int(entry.get("WGPEER_A_TX_BYTES") or 0),
                allowed_ips=tuple(entry["allowed"]),
                persistent_keepalive=keepalive or None,
            )
        )
    return DeviceDump(listen_port=listen_port, peers=tuple(peers))


# --- I/O -----------------------------------------------------------------------------------


def _hint(code: int) -> str:
    if code == errno.EPERM:
        return " (needs CAP_NET_ADMIN: run as root or grant it)"
    if code == errno.ENODEV:
        return " (the link is gone: deleted, or taken over by a newer device of that name)"
    return ""


def _genl(what: str, fn: Callable[[Any], T]) -> T:
    """Run fn on a fresh WireGuard generic netlink socket, errors as one-line WireGuardError."""

    def call() -> T:
        try:
            wg = WireGuard()
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                raise WireGuardError(
                    f"{what}: this kernel has no WireGuard (generic netlink family 'wireguard' "
                    "missing): load the wireguard module or use the userspace backend"
                ) from None
            raise WireGuardError(f"{what}: {os.strerror(exc.code)}{_hint(exc.code)}") from None
        try:
            return fn(wg)
        except NetlinkError as exc:
            raise WireGuardError(f"{what}: {os.strerror(exc.code)}{_hint(exc.code)}") from None
        finally:
            wg.close()

    return iplink.off_loop(call)


class KernelDevice:
    """A kernel WireGuard link owned by this process."""

    def __init__(self, ifname: str, ifindex: int) -> None:
        self._name = ifname
        self.ifindex = ifindex
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    def _send(self, what: str, messages: Sequence[wgmsg]) -> None:
        if self._closed:
            raise WireGuardError(f"cannot {what}: {self._name} is closed")

        def send(wg: Any) -> None:
            for msg in messages:
                tuple(wg.nlm_request(msg, wg.prid, NLM_F_REQUEST | NLM_F_ACK))

        _genl(what, send)

    def dump(self) -> DeviceDump:
        if self._closed:
            raise WireGuardError(f"cannot read {self._name}: it is closed")
        return _genl(
            f"read {self._name}",
            lambda wg: parse_device(
                wg.nlm_request(get_message(self.ifindex), wg.prid, NLM_F_REQUEST | NLM_F_DUMP)
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
