"""The fleet gauges a /metrics scrape reads: counted by the store and the device, unknown (NaN)
while either is away, and never raising (a scrape that raised would lose every series)."""

from __future__ import annotations

import ipaddress
import math
import time

from conftest import Opener

from gatekeeper.server.fleet import CONNECTED_WITHIN, connected_gauge, registered_gauge
from gatekeeper.server.registry import MachineRecord, RegistryError, machine_key
from gatekeeper.wireguard.backend import WireGuardError
from gatekeeper.wireguard.keys import PrivateKey


def claim(reg: object, n: int) -> None:
    reg.claim(  # type: ignore[attr-defined]
        MachineRecord(
            machine_key=machine_key(f"uuid-{n}", None),
            node_uuid=f"uuid-{n}",
            address=ipaddress.IPv6Address(f"fdae:41e4:649b:9303::{n + 10:x}"),
            public_key=PrivateKey.generate().public_key().base64(),
        )
    )


def test_registered_is_the_stores_count_and_nan_while_it_is_away(backend: Opener) -> None:
    reg = backend()
    reachable = True
    gauge = registered_gauge(reg, lambda: reachable)
    assert gauge() == 0
    for n in range(3):
        claim(reg, n)
    assert gauge() == 3
    reachable = False  # the heartbeat found the store away: the scrape does not ask it
    assert math.isnan(gauge())
    reachable = True
    assert gauge() == 3


class FailingStore:
    """Stand-in: a store that fails the count itself, between the heartbeat's last answer and
    the scrape, cannot be timed in a real one (PostgreSQL's backend reconnects on the next
    call)."""

    def machine_count(self) -> int:
        raise RegistryError("registry postgresql://gk@/fleet: connection lost")


def test_registered_is_nan_when_the_count_itself_fails() -> None:
    gauge = registered_gauge(FailingStore(), lambda: True)  # type: ignore[arg-type]
    assert math.isnan(gauge())


class AwayDevice:
    """Stand-in: a device that is gone for a moment (DeviceWatch between a wireguard-go that
    died and its replacement) cannot be produced on demand in a real one."""

    def __init__(self, times: list[float | None]) -> None:
        self.times: list[float | None] | None = times

    def last_handshakes(self) -> list[float | None]:
        if self.times is None:
            raise WireGuardError("wireguard-go for gk0 exited (status -9)")
        return self.times


def test_connected_counts_recent_handshakes_and_is_nan_while_the_device_is_away() -> None:
    now = time.time()
    device = AwayDevice([None, now - 5, now - CONNECTED_WITHIN - 1, now - 100])
    gauge = connected_gauge(device, clock=lambda: now)  # type: ignore[arg-type]
    assert gauge() == 2
    device.times = None
    assert math.isnan(gauge())
    device.times = []
    assert gauge() == 0
