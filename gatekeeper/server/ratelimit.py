"""Per-source limits on failed provisions, so a flood of bad tokens costs almost nothing.

A source (an IPv6 /64 or an IPv4 address: one host can change its low 64 bits at will) has a
budget of `burst` failures that refills at `per_second`. While the budget is empty, its
requests are refused before the key, the UUID or the registry's machines are looked at,
unless they carry a join token that admits someone (`guard.py`): a machine that shares the
flooder's /64 or NAT address is never refused for someone else's failures. Refusals do not
spend budget, so a source that stops comes back by itself. The table is bounded: when full,
the least recently seen sources are forgotten (a forgotten source starts with a full budget,
which only helps the attacker by `burst` attempts).

Pure logic with an injected clock; the gRPC adapter supplies the peer string.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable
from urllib.parse import unquote

from gatekeeper.netaddr import grpc_peer_address, ip_text


def clean_peer(peer: str) -> str:
    """gRPC percent-encodes its peer strings (`ipv6:%5Bfd00::1%5D:5000`): decode them."""
    return unquote(peer)


def peer_address(peer: str) -> str | None:
    """gRPC's peer string -> `[addr]:port` or `a.b.c.d:port`; None when there is none."""
    kind, sep, rest = clean_peer(peer).partition(":")
    if not sep or kind not in ("ipv4", "ipv6") or not rest:
        return None
    return rest


def source_of(peer: str) -> str:
    """gRPC's peer string (`ipv6:[addr]:port`, `ipv4:a.b.c.d:port`) -> the limiter's key."""
    addr = grpc_peer_address(peer)
    if addr is None:
        return clean_peer(peer)
    if isinstance(addr, ipaddress.IPv6Address):
        return f"{ip_text(ipaddress.IPv6Address(int(addr) >> 64 << 64))}/64"
    return ip_text(addr)


class FailureLimiter:
    def __init__(
        self,
        *,
        burst: float = 20,
        per_second: float = 0.5,
        max_sources: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.per_second = per_second
        self.max_sources = max_sources
        self.clock = clock
        # source -> (budget, time of last update), least recently seen first.
        self._table: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _budget(self, source: str, now: float) -> float:
        entry = self._table.get(source)
        if entry is None:
            return self.burst
        budget, then = entry
        return min(self.burst, budget + (now - then) * self.per_second)

    def blocked(self, source: str) -> bool:
        return self._budget(source, self.clock()) < 1

    def failure(self, source: str) -> None:
        now = self.clock()
        budget = self._budget(source, now) - 1
        self._table[source] = (budget, now)
        self._table.move_to_end(source)
        while len(self._table) > self.max_sources:
            self._table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._table)
