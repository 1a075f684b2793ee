"""The liveness probe: one ICMPv6 echo request to the server's overlay address.

We never read the reply here: the lifecycle sees it as received bytes on the WireGuard peer,
which is the only thing that proves the path (a local socket error proves nothing either way).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

ICMPV6_ECHO_REQUEST = 128


def echo_request(ident: int, seq: int) -> bytes:
    # The kernel fills in the ICMPv6 checksum for raw ICMPv6 sockets (RFC 3542).
    return struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + (
        b"gatekeeper-probe"
    )


def send_probe(target: ipaddress.IPv6Address, seq: int) -> None:
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    except PermissionError:
        # Without CAP_NET_RAW a UDP datagram still makes WireGuard send (and handshake);
        # the server's port-unreachable answer is traffic too.
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with sock:
            sock.sendto(b"gatekeeper-probe", (str(target), 9))
        return
    with sock:
        sock.sendto(echo_request(os.getpid(), seq), (str(target), 0))
