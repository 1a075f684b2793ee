"""The one host:port parser and the one gRPC peer-string parser, for every part of the product.

`split_host_port` follows Go's `net.SplitHostPort`, which Talos and the SideroLink servers use:
an IPv6 literal needs brackets (`[fd00::1]:8090`), since `fd00::1:8090` cannot be told apart
from the address `fd00::1:8090` without a port. Unlike Go the port must be a number (1-65535;
0 only where a caller listens). Before this module five parsers disagreed: two refused
`fd00::1:8090`, two took it as host `fd00::1` and port 8090.

`grpc_peer_address` reads `context.peer()` (`ipv6:[fd00::1]:5000`, `ipv4:10.0.0.1:5000`,
percent-encoded by some grpc versions) with the same host:port rule; three copies did that.

`ip_text`, `parse_ip` and `host_network` write and read addresses as ipaddress does, through
inet_ntop and inet_pton in C: a Provision formats and parses its machine's address several
times (store, device, reply, log), and ipaddress does both in Python at 4-11 us a time, on
the thread that shares the GIL with the loop carrying tunnelled traffic.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import unquote

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MSG_BRACKETS = "write IPv6 addresses as [address]:port"
_MAX_SHOWN = 80


def ip_text(address: IPAddress) -> str:
    """`str(address)`, at a sixth of its cost. glibc writes an address whose first 80 bits
    are zero (`::ffff:0:1`, `::1:1`) with a dotted IPv4 tail where ipaddress does not: those
    keep ipaddress's form, so stored text (which lookups compare) never changes."""
    if address.version == 4:
        return socket.inet_ntop(socket.AF_INET, address.packed)
    if int(address) >> 48 == 0:
        return str(address)
    return socket.inet_ntop(socket.AF_INET6, address.packed)


def parse_ip(text: str) -> IPAddress:
    """`ipaddress.ip_address(text)` for an address without a scope (`%eth0` is refused), the
    family chosen by the text: ValueError naming the text when it is not one."""
    if ":" in text:
        return parse_ipv6(text)
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        raise ValueError(f"{text!r} is not an IP address") from None


def parse_ipv6(text: str) -> ipaddress.IPv6Address:
    """`ipaddress.IPv6Address(text)` for an address without a scope: ValueError if not one."""
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        raise ValueError(f"{text!r} is not an IPv6 address") from None


def host_network(address: ipaddress.IPv6Address) -> ipaddress.IPv6Network:
    """The /128 that holds `address` alone (a machine's allowed IP, the server's peer)."""
    return ipaddress.IPv6Network((int(address), 128))


class HostPortError(ValueError):
    """Not host:port; one line: `<what> '<text>' is not host:port: <reason>`."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def split_host_port(
    text: str,
    what: str = "address",
    *,
    allow_port_zero: bool = False,
    allow_empty_host: bool = False,
) -> tuple[str, int]:
    """`host:port` or `[ipv6]:port` -> (host without brackets, port); HostPortError if not.

    The host is returned as written (a name or an address, zone included); callers that need
    an IP literal check it themselves.
    """

    def fail(why: str) -> HostPortError:
        shown = text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
        return HostPortError(f"{what} {shown!r} is not host:port: {why}", why)

    # The one printable whitespace character is the space (checked over every code point).
    if not text.isprintable() or " " in text:
        raise fail("it contains spaces or control characters")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise fail("missing ']'")
        host, after = text[1:end], text[end + 1 :]
        if after == "":
            raise fail("missing port")
        if not after.startswith(":"):
            raise fail("unexpected text after ']'")
        port_text = after[1:]
        if "[" in host or "[" in port_text or "]" in port_text:
            raise fail("unexpected bracket")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise fail("missing port")
        if ":" in host:
            raise fail(MSG_BRACKETS)
        if "[" in text or "]" in text:
            raise fail("unexpected bracket")
    if not host and not allow_empty_host:
        raise fail("missing host")
    lowest = 0 if allow_port_zero else 1
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise fail(f"port must be a number {lowest}..65535")
    port = int(port_text)
    if not lowest <= port <= 65535:
        raise fail(f"port must be a number {lowest}..65535")
    return host, port


def join_host_port(host: str, port: int) -> str:
    """The inverse: brackets around a host that holds a colon (an IPv6 literal)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_peer_address(peer: str) -> IPAddress | None:
    """The source address in a gRPC peer string; IPv4-mapped IPv6 addresses come back as
    IPv4 and zones are dropped. Anything else (unix sockets, garbage) gives None."""
    family, _, rest = unquote(peer).partition(":")
    if family not in ("ipv4", "ipv6"):
        return None
    try:
        host, _port = split_host_port(rest, "peer", allow_port_zero=True)
        address = parse_ip(host.split("%", 1)[0])
    except ValueError:
        return None
    if family == "ipv4":
        return address if isinstance(address, ipaddress.IPv4Address) else None
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    return address.ipv4_mapped or address
