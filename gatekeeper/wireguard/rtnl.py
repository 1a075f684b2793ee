"""A small rtnetlink and generic-netlink client on the standard library's socket.

The agent needs a handful of requests (find a link, set its MTU and state, set addresses,
create or delete a link, ask for a route, look up a generic netlink family). pyroute2 does all
of them, but importing it loads the whole library (about 25 MB and 0.2 s on a host, seconds
under emulation) even when only wireguard-go is used, so these few requests are spoken here.

Every call opens its own socket in the calling thread's network namespace, as pyroute2's
IPRoute did: tests enter a namespace per thread with setns. The kernel answers these requests
synchronously, so a call is a few microseconds of work and may be made from an asyncio loop.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NETLINK_GENERIC = 16

_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLM_F_EXCL = 0x200
_NLM_F_CREATE = 0x400

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26

IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02
RTA_DST = 1
RTA_TABLE = 15
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTN_UNICAST = 1

_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, ...
_ATTR = struct.Struct("=HH")  # rtattr: length, type
_GENL = struct.Struct("=BBH")  # genlmsghdr: command, version, reserved
_TIMEOUT = 5.0


class NetlinkError(OSError):
    """The kernel refused a request; `errno` says why."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))
        self.code = code


@dataclass(frozen=True)
class Link:
    index: int
    flags: int
    mtu: int
    # rtnetlink's kind ("tun", "wireguard", "veth"...), "" when the link reports none.
    kind: str


@dataclass(frozen=True)
class Address:
    index: int
    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    body = _ATTR.pack(_ATTR.size + len(value), kind) + value
    return body + b"\0" * (_align(len(body)) - len(body))


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each rtattr in `data`; the nested flag is stripped from the type."""
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _ATTR.size : offset + length]
        offset += _align(length)


def _cstring(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def request(protocol: int, kind: int, flags: int, payload: bytes) -> list[tuple[int, bytes]]:
    """Send one request; return the (type, body) of each answer, after the ack or dump end.

    Raises NetlinkError when the kernel answers with an error.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol) as sock:
        sock.settimeout(_TIMEOUT)
        sock.bind((0, 0))
        port = sock.getsockname()[0]
        seq = 1
        message = _HEADER.pack(_HEADER.size + len(payload), kind, flags | _NLM_F_REQUEST, seq, 0)
        sock.send(message + payload)
        answers: list[tuple[int, bytes]] = []
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, _mflags, mseq, mport = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    break
                body = data[offset + _HEADER.size : offset + length]
                offset += _align(length)
                if mseq != seq or mport not in (0, port):
                    continue  # not ours (a late answer cannot exist on a fresh socket)
                if mtype == _NLMSG_DONE:
                    return answers
                if mtype == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body)
                    if code:
                        raise NetlinkError(-code)
                    return answers  # the ack
                answers.append((mtype, body))
            # A plain request is answered by one message; acks and dumps end as seen above.
            if answers and not flags & (_NLM_F_ACK | _NLM_F_DUMP):
                return answers


def _route(kind: int, flags: int, payload: bytes) -> list[tuple[int, bytes]]:
    return request(NETLINK_ROUTE, kind, flags, payload)


def _link(body: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(body)
    mtu = 0
    kind = ""
    for key, value in attrs(body[_IFINFO.size :]):
        if key == IFLA_MTU:
            (mtu,) = struct.unpack_from("=I", value)
        elif key == IFLA_LINKINFO:
            for inner, inner_value in attrs(value):
                if inner == IFLA_INFO_KIND:
                    kind = _cstring(inner_value)
    return Link(index=index, flags=flags, mtu=mtu, kind=kind)


def get_link(ifname: str) -> Link | None:
    """The link called `ifname` in this network namespace, or None."""
    payload = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(
        IFLA_IFNAME, ifname.encode() + b"\0"
    )
    try:
        answers = _route(RTM_GETLINK, 0, payload)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    for kind, body in answers:
        if kind == RTM_NEWLINK:
            return _link(body)
    return None


def set_link(index: int, *, mtu: int | None = None, up: bool | None = None) -> None:
    flags = change = 0
    if up is not None:
        flags, change = (IFF_UP if up else 0), IFF_UP
    extra = attr(IFLA_MTU, struct.pack("=I", mtu)) if mtu is not None else b""
    payload = _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change) + extra
    _route(RTM_NEWLINK, _NLM_F_ACK, payload)


def add_link(ifname: str, kind: str) -> None:
    info = attr(IFLA_INFO_KIND, kind.encode())
    payload = (
        _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        + attr(IFLA_IFNAME, ifname.encode() + b"\0")
        + attr(IFLA_LINKINFO, info)
    )
    _route(RTM_NEWLINK, _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL, payload)


def delete_link(index: int) -> None:
    _route(RTM_DELLINK, _NLM_F_ACK, _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0))


def addresses(index: int | None = None) -> list[Address]:
    """Every address in this network namespace, or those of the link `index`."""
    found = []
    for kind, body in _route(RTM_GETADDR, _NLM_F_DUMP, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        if kind != RTM_NEWADDR:
            continue
        family, prefixlen, _flags, _scope, ifindex = _IFADDR.unpack_from(body)
        if index is not None and ifindex != index:
            continue
        values = dict(attrs(body[_IFADDR.size :]))
        # On point-to-point IPv4 links IFA_ADDRESS is the far end; IFA_LOCAL is ours.
        raw = values.get(IFA_LOCAL) or values.get(IFA_ADDRESS)
        if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(raw)
        found.append(Address(ifindex, ipaddress.ip_interface(f"{ip}/{prefixlen}")))
    return found


def _address_payload(
    index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, flags: int
) -> bytes:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    raw = address.ip.packed
    head = _IFADDR.pack(family, address.network.prefixlen, flags, 0, index)
    # IPv4 names the local address twice (IFA_LOCAL is ours, IFA_ADDRESS the peer's end).
    local = attr(IFA_LOCAL, raw) if address.version == 4 else b""
    return head + local + attr(IFA_ADDRESS, raw)


def add_address(
    index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, *, nodad: bool
) -> None:
    flags = IFA_F_NODAD if nodad else 0
    payload = _address_payload(index, address, flags)
    _route(RTM_NEWADDR, _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL, payload)


def delete_address(index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
    _route(RTM_DELADDR, _NLM_F_ACK, _address_payload(index, address, 0))


def has_route(dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether the kernel would route a packet to `dst`."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    head = _RTMSG.pack(family, dst.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
    try:
        answers = _route(RTM_GETROUTE, 0, head + attr(RTA_DST, dst.packed))
    except NetlinkError:
        return False  # ENETUNREACH and the like
    return any(kind == RTM_NEWROUTE for kind, _ in answers)


def has_default_route(family: int) -> bool:
    """Whether the main table holds a unicast default route of `family`."""
    head = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
    for kind, body in _route(RTM_GETROUTE, _NLM_F_DUMP, head):
        if kind != RTM_NEWROUTE:
            continue
        _fam, dst_len, _src, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(body)
        for key, value in attrs(body[_RTMSG.size :]):
            if key == RTA_TABLE:
                (table,) = struct.unpack_from("=I", value)
        if dst_len == 0 and table == RT_TABLE_MAIN and rtype == RTN_UNICAST:
            return True
    return False


def genl_family_id(name: str) -> int:
    """The id of generic netlink family `name` (asking may make the kernel load its module).

    Raises NetlinkError (ENOENT when the family does not exist).
    """
    payload = _GENL.pack(_CTRL_CMD_GETFAMILY, 1, 0) + attr(
        _CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"
    )
    for _kind, body in request(NETLINK_GENERIC, _GENL_ID_CTRL, 0, payload):
        for key, value in attrs(body[_GENL.size :]):
            if key == _CTRL_ATTR_FAMILY_ID:
                (family_id,) = struct.unpack_from("=H", value)
                return int(family_id)
    raise NetlinkError(errno.ENOENT)
