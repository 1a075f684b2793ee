"""How many Watch streams the maintenance API holds open, per peer and per role.

A Watch stays open as long as the client likes, so it is the one call that can pin the
server's capacity: one reader holding 256 Watch streams used to exhaust grpc's global
concurrency limit, and the admin's own Version then failed with RESOURCE_EXHAUSTED. Streams
are counted here instead: a reader address may hold PER_READER, all readers together
READERS; admins (peers in the overlay prefix) draw on a budget of their own, so no reader
can take it from them. A refused stream gets RESOURCE_EXHAUSTED with the reason; a stream
that ends gives its slot back.

Pure bookkeeping (no gRPC), so the rules are tested without a network.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from gatekeeper.maintenance.policy import Role

PER_READER = 16
READERS = 64
ADMINS = 256


@dataclass(frozen=True)
class StreamLimits:
    per_reader: int = PER_READER
    readers: int = READERS
    admins: int = ADMINS


class StreamBudget:
    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits or StreamLimits()
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._per_role: collections.Counter[Role] = collections.Counter()

    def acquire(self, role: Role, peer: str) -> str | None:
        """Take a slot for a stream from `peer` (its source address); None when granted,
        otherwise why not (one line for the RESOURCE_EXHAUSTED status)."""
        limits = self.limits
        if role is Role.ADMIN:
            if self._per_role[Role.ADMIN] >= limits.admins:
                return f"too many open watches from admins ({limits.admins} at most)"
        else:
            if self._per_peer[peer] >= limits.per_reader:
                return (
                    f"too many open watches from this address ({limits.per_reader} at most "
                    "per reader); close some and watch again"
                )
            if self._per_role[Role.READER] >= limits.readers:
                return f"too many open watches from readers ({limits.readers} at most in total)"
        self._per_peer[peer] += 1
        self._per_role[role] += 1
        return None

    def release(self, role: Role, peer: str) -> None:
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]
        self._per_role[role] -= 1

    def open(self, role: Role) -> int:
        return self._per_role[role]
