"""What a tunnel end accepts from a stream (sans-I/O): datagram shape, size, rate.

A stream is an untrusted input: whoever holds a valid header can send anything. Every
datagram is checked before it reaches the WireGuard device, and a stream that misbehaves is
cut off with a status that says why, so one bad machine costs the server little and the other
streams nothing.

WireGuard has four message types, each with a fixed layout (type byte, three zero bytes):
handshake initiation 148 bytes, handshake response 92, cookie reply 64, and transport data of
at least 32 bytes (header 16, then the encrypted, 16-byte padded payload plus a 16-byte tag),
so its length is 32 + a multiple of 16. Anything else cannot be WireGuard.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# UDP cannot carry more, whatever the link.
MAX_UDP_DATAGRAM = 65535
# Transport data is 32 bytes plus the padded inner packet: room for a 9000-byte (jumbo) MTU.
DEFAULT_MAX_DATAGRAM = 9216
_FIXED_SIZES = {1: 148, 2: 92, 3: 64}
_TRANSPORT = 4
_TRANSPORT_MIN = 32


class Verdict(Enum):
    OK = "ok"
    MALFORMED = "malformed"
    OVERSIZED = "oversized"


def check_datagram(datagram: bytes, max_size: int = DEFAULT_MAX_DATAGRAM) -> Verdict:
    n = len(datagram)
    if n > max_size:
        return Verdict.OVERSIZED
    if n < 4 or datagram[1:4] != b"\0\0\0":
        return Verdict.MALFORMED
    kind = datagram[0]
    fixed = _FIXED_SIZES.get(kind)
    if fixed is not None:
        return Verdict.OK if n == fixed else Verdict.MALFORMED
    if kind == _TRANSPORT and n >= _TRANSPORT_MIN and (n - _TRANSPORT_MIN) % 16 == 0:
        return Verdict.OK
    return Verdict.MALFORMED


class TokenBucket:
    """Datagrams per second with a burst allowance; `delay()` says how long to hold back.

    The caller waits instead of dropping: while it waits it does not read the stream, so
    HTTP/2 flow control pushes back on the sender and a flooding peer slows itself down.
    """

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None

    def delay(self, n: int, now: float) -> float:
        """Take `n` tokens at time `now`; seconds to wait before the next take (0: none)."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate


@dataclass(frozen=True)
class Cut:
    """End the stream: `code` is a gRPC status name, `message` the one-line reason."""

    code: str
    message: str


@dataclass
class StreamGuard:
    """Per-stream accounting: which datagrams go on, and when the stream must end.

    Oversized datagrams cut the stream at once (no WireGuard peer sends them). Malformed ones
    are dropped, and cut the stream after `malformed_limit` of them, so a peer that sends a
    stray packet is not punished but one that sends garbage is.
    """

    max_datagram: int = DEFAULT_MAX_DATAGRAM
    malformed_limit: int = 10
    accepted: int = 0
    malformed: int = 0

    def admit(self, datagrams: list[bytes]) -> tuple[list[bytes], Cut | None]:
        good: list[bytes] = []
        for d in datagrams:
            verdict = check_datagram(d, self.max_datagram)
            if verdict is Verdict.OK:
                good.append(d)
            elif verdict is Verdict.OVERSIZED:
                return good, Cut(
                    "INVALID_ARGUMENT",
                    f"datagram of {len(d)} bytes is larger than {self.max_datagram}",
                )
            else:
                self.malformed += 1
                if self.malformed >= self.malformed_limit:
                    return good, Cut(
                        "INVALID_ARGUMENT",
                        f"{self.malformed} datagrams that are not WireGuard messages",
                    )
        self.accepted += len(good)
        return good, None

    def refuse(self, count: int) -> Cut | None:
        """Count datagrams refused for another reason (an un-negotiated batch) as malformed."""
        if count <= 0:
            return None
        self.malformed += count
        if self.malformed >= self.malformed_limit:
            return Cut(
                "INVALID_ARGUMENT", f"{self.malformed} datagrams sent outside the agreed format"
            )
        return None
