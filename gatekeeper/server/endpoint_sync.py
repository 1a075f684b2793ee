"""When the server reads its device for the endpoints machines have been seen at (sans-I/O).

The read covers every peer (about 80 us each across the server and wireguard-go, most of it
Python holding the GIL), so it is done often only while machines join (their endpoints appear
at their first handshake), rarely otherwise, and never in the middle of a provision storm: a
storm's gRPC calls and tunnelled packets share that GIL and event loop, and the endpoints of
machines that just joined are worth no more a second earlier. A steady stream of provisions
defers it only so long (docs/registry.md, "Provision storms").
"""

from __future__ import annotations

from dataclasses import dataclass

# A machine handshakes within seconds of its Provision answer; this covers slow ones.
JOIN_WINDOW = 30.0


@dataclass(frozen=True)
class EndpointSyncSchedule:
    every: float = 5.0
    """Seconds between reads while machines join."""
    idle_every: float = 300.0
    """Seconds between reads when none has joined for JOIN_WINDOW (endpoints change only
    when machines roam)."""
    quiet: float = 1.0
    """A read waits until no Provision has been answered for this long: the storm is over."""
    max_defer: float = 30.0
    """...but never longer than this past its due time."""

    def due(self, now: float, last_sync: float, last_provision: float | None) -> bool:
        """Should the read run now? Times from one monotonic clock; `last_provision` is the
        last answered Provision, None when there was none."""
        since_sync = now - last_sync
        if last_provision is None or now - last_provision >= JOIN_WINDOW:
            return since_sync >= self.idle_every
        if since_sync < self.every:
            return False
        storming = now - last_provision < self.quiet
        return not storming or since_sync >= self.every + self.max_defer

    @property
    def tick(self) -> float:
        """How often to ask `due` (cheap: no I/O until it says yes)."""
        return min(self.every, self.quiet)
