"""A bounded FIFO that drops its OLDEST entry when full (sans-I/O).

Both ends of the tunnel queue datagrams this way (docs/compatibility.md: 100 packets, drop oldest).
For WireGuard the newest datagram is the valuable one: a stale handshake or keepalive is
retried by WireGuard itself, and TCP inside the overlay recovers a lost segment, so under
pressure we keep the fresh end of the queue instead of blocking the producer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_QUEUE_SIZE = 100


class DropOldestQueue(Generic[T]):
    def __init__(self, maxsize: int = DEFAULT_QUEUE_SIZE) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, not {maxsize}")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self.dropped = 0

    def push(self, item: T) -> bool:
        """Append `item`; True when that pushed the oldest entry out."""
        self._items.append(item)
        if len(self._items) > self.maxsize:
            self._items.popleft()
            self.dropped += 1
            return True
        return False

    def pop(self) -> T:
        """The oldest entry; IndexError when empty."""
        return self._items.popleft()

    def peek(self) -> T:
        """The oldest entry without removing it; IndexError when empty."""
        return self._items[0]

    def clear(self) -> int:
        """Empty the queue; how many entries were thrown away."""
        n = len(self._items)
        self._items.clear()
        return n

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)
