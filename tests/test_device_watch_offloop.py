"""Recreating a vanished WireGuard device does not pause the event loop that carries every
gRPC call and tunnelled datagram: wireguard-go is started, and waited for, in a thread of its
own that lives as long as the server (its parent-death signal is tied to that thread)."""

from __future__ import annotations

import asyncio
import threading
import time

from loopbeat import heartbeat

from gatekeeper.server.devicewatch import DeviceWatch, SwappableDevice

SLOW_START_S = 1.0


class StandInDevice:
    """Stands in for a device whose wireguard-go takes a second to start (a loaded host),
    which cannot be produced on demand; the watch, the swap and the loop are real. The
    interface names do not exist, so the watch's link lookups find nothing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed_in: str | None = None

    def close(self) -> None:
        self.closed_in = threading.current_thread().name


async def _run() -> tuple[float, str, StandInDevice, str, str]:
    made_in: list[str] = []

    def create() -> StandInDevice:
        time.sleep(SLOW_START_S)
        made_in.append(threading.current_thread().name)
        return StandInDevice("gk-test-new")

    old = StandInDevice("gk-test-old")
    swappable = SwappableDevice(old)  # type: ignore[arg-type]
    watch = DeviceWatch(swappable, create, lambda: 0)  # type: ignore[arg-type]
    async with heartbeat() as gaps:
        await watch.repair("interface gk-test-old is gone")
        await asyncio.sleep(0.05)  # a beat after it, so a loop held throughout shows a gap
    loop_thread = threading.current_thread().name
    return max(gaps), made_in[0], old, swappable.current.name, loop_thread


def test_recreating_the_device_does_not_pause_the_loop() -> None:
    worst, made_in, old, current, loop_thread = asyncio.run(_run())
    assert current == "gk-test-new"
    assert made_in.startswith("device-create") and old.closed_in == made_in
    assert made_in != loop_thread
    # On the loop, the one-second start would have held the heartbeat for a second.
    assert worst < 0.5, f"the event loop paused {worst:.3f} s while the device was recreated"
