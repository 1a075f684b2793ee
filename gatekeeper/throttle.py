"""Bounded logging of refusals: a flood from one source is a few lines and a count, not one
line per refused request (a log that fills the disk is an attack of its own)."""

from __future__ import annotations

import collections


class LogThrottle:
    """At most `per_window` log lines per source per `window` seconds; the rest are counted.

    `allow()` says whether to log this one, and how many were suppressed since the source's
    last logged line (so that line can say so). The table keeps `max_sources` sources, the
    least recently seen forgotten first.
    """

    def __init__(self, per_window: int, window: float, *, max_sources: int = 4096) -> None:
        self.per_window = per_window
        self.window = window
        self.max_sources = max_sources
        # source -> [window start, logged in window, suppressed since last logged]
        self._table: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def allow(self, source: str, now: float) -> tuple[bool, int]:
        entry = self._table.get(source)
        if entry is None or now - entry[0] >= self.window:
            suppressed = int(entry[2]) if entry is not None else 0
            entry = [now, 0.0, float(suppressed)]
        self._table[source] = entry
        self._table.move_to_end(source)
        while len(self._table) > self.max_sources:
            self._table.popitem(last=False)
        if entry[1] < self.per_window:
            entry[1] += 1
            suppressed, entry[2] = int(entry[2]), 0.0
            return True, suppressed
        entry[2] += 1
        return False, 0
