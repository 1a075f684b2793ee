"""Sans-I/O codec for wireguard-go's UAPI, the text protocol on /var/run/wireguard/<ifname>.sock.

A request is `set=1` or `get=1`, then `key=value` lines, then an empty line. Keys travel in hex,
not base64. Every reply ends with `errno=N` and an empty line; wireguard-go sends N negated
(`errno=-22`). A get reply lists the device fields, then each peer starting at its `public_key`.

Nothing here touches a socket: the userspace backend (and tests) feed bytes in and out.
"""

from __future__ import annotations

import errno as errno_codes
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from gatekeeper.netaddr import ip_text, split_host_port
from gatekeeper.wireguard.backend import IPNetwork, PeerConfig, PeerStats, WireGuardError
from gatekeeper.wireguard.keys import KEY_LEN, PrivateKey, PublicKey

GET_REQUEST = b"get=1\n\n"
MAX_PORT = 65535
MAX_KEEPALIVE = 65535
_MAX_INT_DIGITS = 20  # u64 counters; also keeps a garbage reply from building a huge int
_NSEC_PER_SEC = 1_000_000_000
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_UINT = re.compile(r"[0-9]{1,20}")
_SIGNED = re.compile(r"-?[0-9]{1,20}")
# Lines whose values are secrets: error messages name the line but never echo its value.
_SECRET_KEYS = frozenset({"private_key", "preshared_key"})
_DEVICE_GET_KEYS = frozenset({"private_key", "listen_port", "fwmark"})
# No line of a reply is near this long (the longest, an endpoint, is under 70 bytes).
_MAX_LINE = 4096


class UapiError(WireGuardError):
    """wireguard-go answered a request with a non-zero errno."""

    def __init__(self, errno: int, what: str = "request", detail: str = "") -> None:
        self.errno = errno
        name = errno_codes.errorcode.get(errno, "?")
        message = f"wireguard-go refused {what}: {os.strerror(errno)} ({name}, errno {errno})"
        if detail:
            message += f"; it says: {detail}"
        super().__init__(message)


class UapiProtocolError(WireGuardError):
    """Bytes that are not a well-formed UAPI message."""


@dataclass(frozen=True)
class PeerUpdate:
    """One peer section of a set request (the UAPI's own vocabulary, one field per key)."""

    public_key: PublicKey
    remove: bool = False
    # Touch the peer only if it already exists (never create it).
    update_only: bool = False
    replace_allowed_ips: bool = False
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: str | None = None
    # Seconds; 0 turns keepalives off; None leaves the current setting.
    persistent_keepalive: int | None = None

    @classmethod
    def from_config(cls, peer: PeerConfig) -> PeerUpdate:
        """The update that makes the peer match `peer`: allowed IPs and keepalive are replaced.

        An endpoint of None keeps whatever the device learnt (UAPI cannot clear one).
        """
        return cls(
            public_key=peer.public_key,
            replace_allowed_ips=True,
            allowed_ips=tuple(peer.allowed_ips),
            endpoint=peer.endpoint,
            persistent_keepalive=peer.persistent_keepalive or 0,
            update_only=peer.update_only,
        )

    @classmethod
    def removal(cls, public_key: PublicKey) -> PeerUpdate:
        return cls(public_key=public_key, remove=True)


@dataclass(frozen=True)
class SetRequest:
    private_key: PrivateKey | None = None
    listen_port: int | None = None
    replace_peers: bool = False
    peers: tuple[PeerUpdate, ...] = ()


@dataclass(frozen=True)
class DeviceState:
    """What a get request reports about the device."""

    private_key: PrivateKey | None = field(default=None, repr=False)
    # 0 while the device has no bound UDP socket.
    listen_port: int = 0
    fwmark: int = 0
    peers: tuple[PeerStats, ...] = ()

    @property
    def public_key(self) -> PublicKey | None:
        return None if self.private_key is None else self.private_key.public_key()


# --- values ------------------------------------------------------------------------------------


def format_endpoint(endpoint: str) -> str:
    """Validate an `ip:port` / `[ipv6]:port` endpoint and return it in canonical form."""
    if not isinstance(endpoint, str):
        raise ValueError(f"endpoint {endpoint!r}: expected 'ip:port' or '[ipv6]:port'")
    host, port = split_host_port(endpoint, "endpoint")  # the one rule: gatekeeper.netaddr
    try:
        address = _ip_address(host)
    except ValueError:
        raise ValueError(
            f"endpoint {endpoint!r}: {host!r} is not an IP address (resolve names before use)"
        ) from None
    if address.version == 4 and endpoint.startswith("["):
        raise ValueError(f"endpoint {endpoint!r}: brackets are only for IPv6 addresses")
    return f"[{address.compressed}]:{port}" if address.version == 6 else f"{address}:{port}"


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """ipaddress.ip_address, the family chosen by the text (see _network)."""
    return ipaddress.IPv6Address(text) if ":" in text else ipaddress.IPv4Address(text)


def _parse_network(text: str) -> IPNetwork:
    """`address/prefix` as ipaddress.ip_network(strict=False) reads it, at a fraction of its
    cost: a get reply at 10,000 peers holds 10,000 of these, parsed while holding the GIL
    (ip_network tries IPv4 first and fails slowly on every IPv6 value, then parses the text
    in Python; inet_pton parses it in C). Unlike ip_network it refuses a scope
    (`fd00::%eth0/64`), which an allowed IP never carries, and a netmask after the slash."""
    address, slash, prefix = text.partition("/")
    family, bits, cls = (
        (socket.AF_INET6, 128, ipaddress.IPv6Network)
        if ":" in address
        else (socket.AF_INET, 32, ipaddress.IPv4Network)
    )
    if slash and not (prefix.isdigit() and len(prefix) <= 3 and int(prefix) <= bits):
        raise ValueError(f"bad prefix length {prefix!r}")
    try:
        packed = socket.inet_pton(family, address)
    except OSError:
        raise ValueError(f"{address!r} is not an IP address") from None
    return cls((int.from_bytes(packed, "big"), int(prefix) if slash else bits), strict=False)


def _check_range(what: str, value: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError(f"{what} must be an integer 0..{maximum}, got {value!r}")
    return value


def _network_text(peer: PeerUpdate, network: IPNetwork) -> str:
    if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise ValueError(
            f"peer {peer.public_key.fingerprint()}: allowed IP {network!r} is not an "
            "ipaddress network"
        )
    return f"{ip_text(network.network_address)}/{network.prefixlen}"


# --- set ---------------------------------------------------------------------------------------


def _peer_lines(peer: PeerUpdate) -> Iterator[str]:
    yield f"public_key={peer.public_key.hex()}"
    if peer.remove:
        if peer.allowed_ips or peer.endpoint or peer.persistent_keepalive is not None:
            raise ValueError(
                f"peer {peer.public_key.fingerprint()}: a removal carries no other settings"
            )
        yield "remove=true"
        return
    if peer.update_only:
        yield "update_only=true"
    if peer.endpoint is not None:
        yield f"endpoint={format_endpoint(peer.endpoint)}"
    if peer.persistent_keepalive is not None:
        keepalive = _check_range(
            f"peer {peer.public_key.fingerprint()}: persistent keepalive",
            peer.persistent_keepalive,
            MAX_KEEPALIVE,
        )
        yield f"persistent_keepalive_interval={keepalive}"
    if peer.replace_allowed_ips:
        yield "replace_allowed_ips=true"
    for network in peer.allowed_ips:
        yield f"allowed_ip={_network_text(peer, network)}"


def encode_set(request: SetRequest) -> bytes:
    """The bytes of a set request; ValueError names the first invalid field."""
    lines = ["set=1"]
    if request.private_key is not None:
        lines.append(f"private_key={request.private_key.hex()}")
    if request.listen_port is not None:
        lines.append(f"listen_port={_check_range('listen port', request.listen_port, MAX_PORT)}")
    if request.replace_peers:
        lines.append("replace_peers=true")
    for peer in request.peers:
        lines.extend(_peer_lines(peer))
    return ("\n".join(lines) + "\n\n").encode()


def encode_peers(peers: Iterable[PeerConfig]) -> bytes:
    """A set request that adds or updates these peers, leaving all others alone."""
    return encode_set(SetRequest(peers=tuple(PeerUpdate.from_config(p) for p in peers)))


def encode_remove(public_keys: Iterable[PublicKey]) -> bytes:
    return encode_set(SetRequest(peers=tuple(PeerUpdate.removal(k) for k in public_keys)))


# --- parsing helpers ---------------------------------------------------------------------------


def _lines(data: bytes, what: str) -> list[tuple[int, str, str]]:
    """Split a complete message into (line number, key, value), without the blank terminator."""
    if not isinstance(data, bytes | bytearray):
        raise UapiProtocolError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        text = bytes(data).decode("ascii")
    except UnicodeDecodeError as exc:
        raise UapiProtocolError(f"{what}: byte {exc.start} is not ASCII") from None
    if not text.endswith("\n\n"):
        raise UapiProtocolError(f"{what}: does not end with an empty line (truncated?)")
    body = text[:-2]
    result = []
    for number, line in enumerate(body.split("\n") if body else [], start=1):
        key, sep, value = line.partition("=")
        if not sep or not key:
            shown = line[:40]
            raise UapiProtocolError(f"{what}, line {number}: {shown!r} is not key=value")
        result.append((number, key, value))
    return result


def _where(what: str, number: int, key: str, value: str) -> str:
    shown = "<secret>" if key in _SECRET_KEYS else repr(value[:70])
    return f"{what}, line {number} ({key}={shown})"


def _uint(what: str, number: int, key: str, value: str, maximum: int | None = None) -> int:
    if not _UINT.fullmatch(value):
        raise UapiProtocolError(f"{_where(what, number, key, value)}: not an unsigned integer")
    result = int(value)
    if maximum is not None and result > maximum:
        raise UapiProtocolError(f"{_where(what, number, key, value)}: larger than {maximum}")
    return result


def _key_bytes(what: str, number: int, key: str, value: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        raise UapiProtocolError(f"{_where(what, number, key, value)}: not {KEY_LEN * 2} hex digits")
    return bytes.fromhex(value)


def _true(what: str, number: int, key: str, value: str) -> bool:
    if value != "true":
        raise UapiProtocolError(f"{_where(what, number, key, value)}: the only value is 'true'")
    return True


def _network(what: str, number: int, key: str, value: str) -> IPNetwork:
    try:
        return _parse_network(value)
    except ValueError:
        raise UapiProtocolError(f"{_where(what, number, key, value)}: not an IP network") from None


def _endpoint(what: str, number: int, key: str, value: str) -> str:
    try:
        return format_endpoint(value)
    except ValueError as exc:
        raise UapiProtocolError(f"{_where(what, number, key, value)}: {exc}") from None


def decode_errno(data: bytes, what: str = "UAPI reply") -> int:
    """The errno of a complete reply as a positive number (0: success).

    An empty reply means wireguard-go closed the connection without answering, which it does
    for an operation it does not know.
    """
    return _errno_of(_reply_lines(data, what), what)


def _reply_lines(data: bytes, what: str) -> list[tuple[int, str, str]]:
    if not data:
        raise UapiProtocolError(f"{what}: empty (the connection closed without an answer)")
    return _lines(data, what)


def _errno_of(lines: list[tuple[int, str, str]], what: str) -> int:
    """The errno of a reply already split into lines (a get reply is split once: at 10,000
    peers each split is about 0.1 s of the GIL)."""
    if not lines or lines[-1][1] != "errno":
        raise UapiProtocolError(f"{what}: the last line is not errno=N")
    number, key, value = lines[-1]
    if not _SIGNED.fullmatch(value):
        raise UapiProtocolError(f"{_where(what, number, key, value)}: not an integer")
    return abs(int(value))


def check_set_reply(data: bytes, what: str = "set request") -> None:
    """Raise UapiError unless a set reply is exactly `errno=0`."""
    lines = _lines(data, f"reply to {what}") if data else []
    if len(lines) > 1:
        raise UapiProtocolError(f"reply to {what}: {len(lines)} lines, expected only errno=N")
    code = decode_errno(data, f"reply to {what}")
    if code:
        raise UapiError(code, what)


def reply_complete(buffer: bytes | bytearray) -> bool:
    """Whether `buffer` holds a whole reply (every reply ends with an empty line)."""
    return buffer.endswith(b"\n\n")


# --- set (decoding, for round trips and for anything that serves UAPI) ------------------------


def decode_set(data: bytes) -> SetRequest:
    """Parse a set request; UapiProtocolError names the offending line."""
    what = "set request"
    lines = _lines(data, what)
    if not lines or (lines[0][1], lines[0][2]) != ("set", "1"):
        raise UapiProtocolError(f"{what}: does not start with set=1")
    private_key: PrivateKey | None = None
    listen_port: int | None = None
    replace_peers = False
    peers: list[PeerUpdate] = []
    for number, key, value in lines[1:]:
        if key == "public_key":
            peers.append(PeerUpdate(PublicKey(_key_bytes(what, number, key, value))))
        elif not peers:
            if key == "private_key":
                private_key = PrivateKey(_key_bytes(what, number, key, value))
            elif key == "listen_port":
                listen_port = _uint(what, number, key, value, MAX_PORT)
            elif key == "replace_peers":
                replace_peers = _true(what, number, key, value)
            else:
                raise UapiProtocolError(f"{_where(what, number, key, value)}: unknown device key")
        else:
            peers[-1] = _set_peer_field(peers[-1], what, number, key, value)
    return SetRequest(private_key, listen_port, replace_peers, tuple(peers))


def _set_peer_field(peer: PeerUpdate, what: str, number: int, key: str, value: str) -> PeerUpdate:
    if key == "remove":
        return replace(peer, remove=_true(what, number, key, value))
    if key == "update_only":
        return replace(peer, update_only=_true(what, number, key, value))
    if key == "replace_allowed_ips":
        return replace(peer, replace_allowed_ips=_true(what, number, key, value))
    if key == "endpoint":
        return replace(peer, endpoint=_endpoint(what, number, key, value))
    if key == "persistent_keepalive_interval":
        keepalive = _uint(what, number, key, value, MAX_KEEPALIVE)
        return replace(peer, persistent_keepalive=keepalive)
    if key == "allowed_ip":
        network = _network(what, number, key, value)
        return replace(peer, allowed_ips=(*peer.allowed_ips, network))
    if key in ("protocol_version", "preshared_key"):
        return peer
    raise UapiProtocolError(f"{_where(what, number, key, value)}: unknown peer key")


# --- get ---------------------------------------------------------------------------------------


@dataclass
class _PeerFields:
    public_key: PublicKey
    endpoint: str | None = None
    handshake_sec: int = 0
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0
    allowed_ips: list[IPNetwork] = field(default_factory=list)

    def stats(self) -> PeerStats:
        handshake = None
        if self.handshake_sec or self.handshake_nsec:
            handshake = self.handshake_sec + self.handshake_nsec / _NSEC_PER_SEC
        return PeerStats(
            public_key=self.public_key,
            endpoint=self.endpoint,
            last_handshake=handshake,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            allowed_ips=tuple(self.allowed_ips),
            persistent_keepalive=self.keepalive or None,
        )


# A peer's first line, or its handshake's seconds (decode_handshakes).
_HANDSHAKE_LINE = re.compile(
    rb"^(?:public_key=[0-9a-fA-F]{64}|last_handshake_time_sec=([0-9]{1,20}))$", re.MULTILINE
)


def decode_handshakes(data: bytes) -> list[float | None]:
    """Each peer's last handshake from a whole get reply (see HandshakeReader)."""
    reader = HandshakeReader()
    reader.feed(data)
    return reader.result()


class HandshakeReader:
    """Each peer's last handshake from a get reply, to the second (None: none yet), fed in
    pieces as the reply arrives.

    What decode_get reads as `last_handshake`, without validating and building every other
    field: at 10,000 peers decode_get holds the GIL about a quarter of a second, this a few
    ms; and it holds one piece at a time, not the whole reply (2.7 MB at 10,000 peers, which
    a metrics scrape's thread would otherwise leave behind in its malloc arena). The reply's
    end and errno are checked as decode_get checks them; other lines are not looked at, so
    use decode_get for anything but these times.
    """

    def __init__(self, what: str = "get reply") -> None:
        self.what = what
        self.times: list[float | None] = []
        self._rest = b""  # an incomplete last line
        self._last = b""  # the last complete non-empty line
        self._tail = b""  # the last two bytes of complete lines
        self._lines = 0
        self._seen = False

    @property
    def complete(self) -> bool:
        """Whether the reply has ended (every reply ends with an empty line)."""
        return self._tail == b"\n\n" and not self._rest

    def feed(self, chunk: bytes) -> None:
        self._seen = self._seen or bool(chunk)
        data = self._rest + bytes(chunk)
        cut = data.rfind(b"\n") + 1
        lines, self._rest = data[:cut], data[cut:]
        if len(self._rest) > _MAX_LINE:
            raise UapiProtocolError(f"{self.what}: a line longer than {_MAX_LINE} bytes")
        if not lines:
            return
        self._lines += lines.count(b"\n")
        self._tail = (self._tail + lines)[-2:]
        body = lines.rstrip(b"\n")
        if body:
            self._last = body.rpartition(b"\n")[2]
        for seconds in _HANDSHAKE_LINE.findall(lines):
            if not seconds:
                self.times.append(None)
            elif self.times:
                self.times[-1] = float(seconds) or None

    def result(self) -> list[float | None]:
        what = self.what
        if not self._seen:
            raise UapiProtocolError(f"{what}: empty (the connection closed without an answer)")
        if not self.complete:
            raise UapiProtocolError(f"{what}: does not end with an empty line (truncated?)")
        try:
            key, _, value = self._last.decode("ascii").partition("=")
        except UnicodeDecodeError:
            raise UapiProtocolError(f"{what}: the last line is not errno=N") from None
        code = _errno_of([(self._lines - 1, key, value)], what)
        if code:
            raise UapiError(code, "get")
        return self.times


def decode_get(data: bytes) -> DeviceState:
    """Parse a complete get reply; UapiError if it carries a non-zero errno.

    Keys this version does not know are skipped, so a newer wireguard-go still parses.
    """
    what = "get reply"
    lines = _reply_lines(data, what)
    code = _errno_of(lines, what)
    if code:
        raise UapiError(code, "get")
    private_key: PrivateKey | None = None
    listen_port = 0
    fwmark = 0
    peers: list[_PeerFields] = []
    for number, key, value in lines[:-1]:
        if key == "public_key":
            peers.append(_PeerFields(PublicKey(_key_bytes(what, number, key, value))))
        elif not peers:
            if key == "private_key":
                private_key = PrivateKey(_key_bytes(what, number, key, value))
            elif key == "listen_port":
                listen_port = _uint(what, number, key, value, MAX_PORT)
            elif key == "fwmark":
                fwmark = _uint(what, number, key, value, 0xFFFFFFFF)
            elif key == "errno":
                raise UapiProtocolError(f"{what}, line {number}: errno before the end")
        elif key in _DEVICE_GET_KEYS:
            raise UapiProtocolError(f"{_where(what, number, key, value)}: device key among peers")
        else:
            _peer_field(peers[-1], what, number, key, value)
    return DeviceState(private_key, listen_port, fwmark, tuple(p.stats() for p in peers))


def _peer_field(peer: _PeerFields, what: str, number: int, key: str, value: str) -> None:
    if key == "endpoint":
        peer.endpoint = _endpoint(what, number, key, value)
    elif key == "last_handshake_time_sec":
        peer.handshake_sec = _uint(what, number, key, value)
    elif key == "last_handshake_time_nsec":
        peer.handshake_nsec = _uint(what, number, key, value, _NSEC_PER_SEC - 1)
    elif key == "rx_bytes":
        peer.rx_bytes = _uint(what, number, key, value)
    elif key == "tx_bytes":
        peer.tx_bytes = _uint(what, number, key, value)
    elif key == "persistent_keepalive_interval":
        peer.keepalive = _uint(what, number, key, value, MAX_KEEPALIVE)
    elif key == "allowed_ip":
        peer.allowed_ips.append(_network(what, number, key, value))
    elif key == "errno":
        raise UapiProtocolError(f"{what}, line {number}: errno before the end")


def encode_get_reply(state: DeviceState) -> bytes:
    """The reply wireguard-go would give for `state` (the inverse of decode_get)."""
    lines: list[str] = []
    if state.private_key is not None:
        lines.append(f"private_key={state.private_key.hex()}")
    if state.listen_port:
        lines.append(f"listen_port={state.listen_port}")
    if state.fwmark:
        lines.append(f"fwmark={state.fwmark}")
    for peer in state.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append("protocol_version=1")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        sec, nsec = _split_time(peer.last_handshake)
        lines.append(f"last_handshake_time_sec={sec}")
        lines.append(f"last_handshake_time_nsec={nsec}")
        lines.append(f"tx_bytes={peer.tx_bytes}")
        lines.append(f"rx_bytes={peer.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive or 0}")
        lines.extend(
            f"allowed_ip={_network_text(PeerUpdate(peer.public_key), n)}" for n in peer.allowed_ips
        )
    lines.append("errno=0")
    return ("\n".join(lines) + "\n\n").encode()


def _split_time(timestamp: float | None) -> tuple[int, int]:
    if timestamp is None:
        return 0, 0
    sec = int(timestamp)
    nsec = min(round((timestamp - sec) * _NSEC_PER_SEC), _NSEC_PER_SEC - 1)
    return sec, nsec
