"""When the server reads its device for the endpoints machines have been seen at (sans-I/O).

The read covers every peer (about 80 us each across the server and wireguard-go, most of it
Python holding the GIL) and also turns the server's keepalive on for peers that have just
handshaked. So it is done often only while machines join (their endpoints appear at their
first handshake), rarely otherwise, and, once due, it waits while Provisions are being
answered OK: a storm's gRPC calls and tunnelled packets share that GIL and event loop, and
nothing in it is urgent to the second. A steady stream of provisions makes it wait 30 s at
most, counted from when it fell due. A read already running when a storm starts runs on
(docs/registry.md, "Provision storms").
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
    """A due read waits until no Provision has been answered OK for this long."""
    max_defer: float = 30.0
    """...but no longer than this after it fell due."""

    @property
    def tick(self) -> float:
        """How often to ask `EndpointSyncTimer.due` (cheap: no I/O until it says yes)."""
        return min(self.every, self.quiet)

    def start(self, now: float) -> EndpointSyncTimer:
        return EndpointSyncTimer(self, last_sync=now)


@dataclass
class EndpointSyncTimer:
    """One server's schedule in time: `due` says whether to read now, `ran` that it did."""

    schedule: EndpointSyncSchedule
    last_sync: float
    # When the read fell due and found a storm; None while it is not waiting.
    waiting_since: float | None = None

    def due(self, now: float, last_provision: float | None) -> bool:
        """Times from one monotonic clock; `last_provision`: the last Provision answered OK,
        None when there was none."""
        s = self.schedule
        since_answer = None if last_provision is None else now - last_provision
        joining = since_answer is not None and since_answer < JOIN_WINDOW
        if now - self.last_sync < (s.every if joining else s.idle_every):
            return False
        if since_answer is None or since_answer >= s.quiet:
            return True
        if self.waiting_since is None:
            self.waiting_since = now
        return now - self.waiting_since >= s.max_defer

    def ran(self, now: float) -> None:
        self.last_sync = now
        self.waiting_since = None
