"""ICMPv6 echo over the overlay, with its round-trip time, for `ping` and `netcheck`.

A raw ICMPv6 socket (root or CAP_NET_RAW, as the agent has): replies are matched by the
server's address, our identifier and the sequence number, so other pings on the machine do
not count. With `dont_fragment` the kernel refuses to split a datagram larger than the link
MTU, which is what a path-MTU check needs.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time

from gatekeeper.agent.probe import ICMPV6_ECHO_REQUEST

ICMPV6_ECHO_REPLY = 129
IPV6_HEADER = 40
ICMPV6_HEADER = 8
# Linux: <linux/in6.h>; Python's socket module does not name it.
IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)


class EchoError(OSError):
    """The echo could not be sent at all (no privilege, no route); the message says why."""


def echo(
    target: ipaddress.IPv6Address,
    seq: int,
    *,
    timeout: float,
    size: int = 64,
    dont_fragment: bool = False,
) -> float | None:
    """Seconds until the reply, or None when none came within `timeout`.

    `size` is the whole IPv6 packet, headers included (1280 fills the overlay's MTU).
    """
    ident = os.getpid() & 0xFFFF
    payload = b"gatekeeper-ping".ljust(max(0, size - IPV6_HEADER - ICMPV6_HEADER), b".")
    request = struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF) + payload
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    except PermissionError:
        raise EchoError("an ICMPv6 echo needs root (CAP_NET_RAW): run with sudo") from None
    with sock:
        if dont_fragment:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
        started = time.monotonic()
        try:
            sock.sendto(request, (str(target), 0))
        except OSError as exc:
            raise EchoError(f"cannot send to {target}: {exc.strerror or exc}") from None
        deadline = started + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, peer = sock.recvfrom(65536)
            if ipaddress.IPv6Address(peer[0].split("%")[0]) != target or len(data) < 8:
                continue
            kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", data[:8])
            if kind == ICMPV6_ECHO_REPLY and got_ident == ident and got_seq == seq & 0xFFFF:
                return time.monotonic() - started
    return None
