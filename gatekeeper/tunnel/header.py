"""The `x-siderolink-ipv6-addr` header and the tunnel's virtual addresses (sans-I/O).

A tunnel peer is named by a virtual IPv6 address:port in the installation's `…:9304::/64`
prefix, port 50889. Like Omni, Gatekeeper makes it unguessable and keeps it while the machine
keeps its key (docs/compatibility.md): the low 64 bits are an HMAC of the machine's public key
under a secret only the server holds (derived from its private key). So it is stable across
re-provisions and server restarts (a restarted server re-admits the same streams without a new
Provision) and needs no registry column, yet nobody who merely knows the machine's overlay
address can name its stream, and so nobody else can displace it ("peer replaced") either.
A stream carries only WireGuard datagrams, which the server's device authenticates with the
machine's key: even a stream under the right name cannot read or inject overlay traffic.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable

from gatekeeper.overlay import TUNNEL_SUFFIX

PEER_HEADER = "x-siderolink-ipv6-addr"
VIRTUAL_PORT = 50889
_MAX_HEADER = 64  # "[" + 39 + "]:" + 5 is 47; anything much longer is not an address


class HeaderError(ValueError):
    """The header is missing or is not `[IPv6]:port`; the message says which."""


def format_addr_port(address: ipaddress.IPv6Address, port: int) -> str:
    """`[addr]:port` with the address in RFC 5952 form (lowercase, longest zero run `::`)."""
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return f"[{address}]:{port}"


def parse_addr_port(value: str) -> tuple[ipaddress.IPv6Address, int]:
    """Parse `[IPv6]:port` in any spelling the address allows; HeaderError when it is not."""
    shown = value[:_MAX_HEADER] + ("…" if len(value) > _MAX_HEADER else "")
    if len(value) > _MAX_HEADER:
        raise HeaderError(f"{PEER_HEADER} value {shown!r} is too long for [IPv6]:port")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host.startswith("[") or not host.endswith("]"):
        raise HeaderError(f"{PEER_HEADER} value {shown!r} is not [IPv6]:port")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise HeaderError(f"{PEER_HEADER} value {shown!r} has no valid port (1-65535)")
    inner = host[1:-1]
    if "%" in inner:
        raise HeaderError(f"{PEER_HEADER} value {shown!r} carries a zone, which it may not")
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        raise HeaderError(f"{PEER_HEADER} value {shown!r} holds no IPv6 address") from None
    return address, int(port_text)


def canonical_peer(value: str | None) -> str:
    """The header value in canonical form; HeaderError when it is missing or unparsable."""
    if value is None or value == "":
        raise HeaderError(f"the {PEER_HEADER} header is required")
    address, port = parse_addr_port(value)
    return format_addr_port(address, port)


def header_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The first `x-siderolink-ipv6-addr` value in gRPC metadata (pairs), as text or None."""
    for key, value in metadata or ():
        if key == PEER_HEADER:
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            return str(value)
    return None


def tunnel_prefix_for(overlay: ipaddress.IPv6Network) -> ipaddress.IPv6Network:
    """The tunnel's /64 beside an overlay prefix: the same bytes with byte 7 = 0x04."""
    packed = bytearray(overlay.network_address.packed)
    packed[7] = TUNNEL_SUFFIX
    return ipaddress.IPv6Network((bytes(packed[:8]) + bytes(8), 64))


def tunnel_secret(server_private_key: str) -> bytes:
    """The HMAC key for virtual addresses, from the server's private key (base64)."""
    return hashlib.sha256(b"gatekeeper tunnel address\0" + server_private_key.encode()).digest()


def tunnel_addr_port(
    tunnel_prefix: ipaddress.IPv6Network,
    secret: bytes,
    node_public_key: str,
    port: int = VIRTUAL_PORT,
) -> str:
    """The virtual `[addr]:port` of the machine with this key (module doc: why an HMAC)."""
    digest = hmac.new(secret, node_public_key.encode(), hashlib.sha256).digest()
    virtual = ipaddress.IPv6Address(tunnel_prefix.network_address.packed[:8] + digest[:8])
    return format_addr_port(virtual, port)
