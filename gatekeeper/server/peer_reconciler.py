"""The WireGuard device as the reconciled result of the registry (docs/registry.md).

One code path puts this instance's device in line with the store: startup restore, the
device's re-creation, `gatekeeper machines remove` (from any host, against a shared registry),
a machine that provisioned through another instance, and a take-over after an instance died all
end here. The device holds exactly the machines this instance owns (`MachineRecord.owner`):
with one server key and one `::1` shared by every instance, a machine's peer must live on one
device only, or two instances would each answer and send to it and its session would ping-pong.

`diff` is pure; `PeerReconciler` is the thin adapter that reads the store and the device and
applies the difference. It runs in a thread of its own (store and UAPI calls block), woken by
the registry's change feed and at least every FULL_EVERY seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from gatekeeper.server.provisioning import SERVER_KEEPALIVE
from gatekeeper.server.registry import ChangeFeed, MachineRecord, Registry
from gatekeeper.wireguard.backend import Device, PeerConfig, PeerStats
from gatekeeper.wireguard.keys import PublicKey

log = logging.getLogger(__name__)

# A reconcile even when the feed stayed quiet: catches what no feed can see (a peer someone
# removed with `wg set` by hand, a notification lost with its connection).
FULL_EVERY = 60.0
# Many changes close together (a provision storm through another instance) are read once:
# after a wake-up the reconciler waits this long for more before it reads the store.
SETTLE = 0.05


def owns(record: MachineRecord, instance: str) -> bool:
    """A record written before owners existed (None) is anyone's until a heartbeat takes it."""
    return record.owner is None or record.owner == instance


def _allowed(record: MachineRecord) -> tuple[ipaddress.IPv6Network, ...]:
    # A machine's own /128 only: machines never reach each other through the server.
    return (ipaddress.IPv6Network(f"{record.address}/128"),)


def desired_peer(record: MachineRecord, endpoint: str | None) -> PeerConfig:
    """The peer a record asks for. Keepalive only where there is somewhere to send to: without
    an endpoint wireguard-go would only spin; the peer gets it at its first handshake."""
    return PeerConfig(
        public_key=PublicKey.from_base64(record.public_key),
        allowed_ips=_allowed(record),
        endpoint=endpoint,
        persistent_keepalive=SERVER_KEEPALIVE if endpoint else None,
    )


@dataclass(frozen=True)
class PeerDiff:
    # Records this instance owns whose peer the device lacks, or holds with other allowed IPs.
    add: tuple[MachineRecord, ...]
    # Device peers no record of this instance names (removed, or owned elsewhere now).
    remove: tuple[PublicKey, ...]
    # The overlay addresses the removed peers held (their tunnel streams end too).
    removed_addresses: tuple[ipaddress.IPv6Address, ...]

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def diff(
    records: Iterable[MachineRecord],
    device_peers: Iterable[PeerStats],
    *,
    instance: str,
    in_flight: Collection[str] = (),
) -> PeerDiff:
    """What to change so the device holds exactly one peer per record `instance` owns.

    A peer that matches its record (same key, same allowed IPs) is left alone: setting it
    again would replace the endpoint its live session learned. Keys in `in_flight` are being
    provisioned through this instance right now: Provision puts the peer on the device before
    its claim commits, so the reconciler neither removes nor adds them until it has settled.
    """
    wanted = {r.public_key: r for r in records if owns(r, instance)}
    held = {p.public_key.base64(): p for p in device_peers}
    add = tuple(
        r
        for key, r in wanted.items()
        if key not in in_flight
        and (key not in held or set(held[key].allowed_ips) != set(_allowed(r)))
    )
    gone = [p for key, p in held.items() if key not in wanted and key not in in_flight]
    addresses = tuple(
        net.network_address
        for p in gone
        for net in p.allowed_ips
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen == 128
    )
    return PeerDiff(add=add, remove=tuple(p.public_key for p in gone), removed_addresses=addresses)


@dataclass(frozen=True)
class Applied:
    added: int
    removed: int


class PeerReconciler:
    """Converges one device to the registry. `reconcile` is thread-safe and blocks (store and
    device calls); `start` runs it in a thread of its own until `stop`."""

    def __init__(
        self,
        registry: Registry,
        device: Device,
        *,
        instance: str,
        endpoint_of: Callable[[MachineRecord], str | None],
        forget_address: Callable[[ipaddress.IPv6Address], None],
        in_flight: Callable[[], Collection[str]] = lambda: (),
    ) -> None:
        self.registry = registry
        self.device = device
        self.instance = instance
        self.endpoint_of = endpoint_of
        self.forget_address = forget_address
        self.in_flight = in_flight
        # Two reconciles at once (the feed's and a DeviceWatch repair) would read the same
        # device state and both add the same peers; one at a time is enough.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._feed: ChangeFeed | None = None
        self.passes = 0
        self.last_error: str | None = None

    def reconcile(self) -> Applied:
        with self._lock:
            # The in-flight set is read before the store: a claim that commits in between is
            # then either still in flight (skipped) or already visible in the records.
            busy = frozenset(self.in_flight())
            records = self.registry.machines()
            change = diff(records, self.device.peers(), instance=self.instance, in_flight=busy)
            if change.add:
                self.device.set_peers([desired_peer(r, self.endpoint_of(r)) for r in change.add])
            for key in change.remove:
                self.device.remove_peer(key)
            for address in change.removed_addresses:
                self.forget_address(address)
            self.passes += 1
            if change:
                log.info(
                    "WireGuard peers reconciled with the registry: %d added, %d removed",
                    len(change.add),
                    len(change.remove),
                )
            return Applied(added=len(change.add), removed=len(change.remove))

    def start(self, *, full_every: float = FULL_EVERY) -> None:
        self._feed = self.registry.change_feed()
        self._thread = threading.Thread(
            target=self._run, args=(self._feed, full_every), name="peer-reconciler", daemon=True
        )
        self._thread.start()

    def _run(self, feed: ChangeFeed, full_every: float) -> None:
        last_full = time.monotonic()
        pending = False  # the last pass failed: try again without waiting for a change
        while not self._stop.is_set():
            left = max(0.0, full_every - (time.monotonic() - last_full))
            changed = feed.wait(0.0 if pending else min(left, 1.0))
            if self._stop.is_set():
                return
            if not (changed or pending or time.monotonic() - last_full >= full_every):
                continue
            if changed:
                self._stop.wait(SETTLE)
            try:
                self.reconcile()
            except Exception as exc:  # a store outage must not end the loop; it retries
                if not pending:
                    log.warning("peer reconcile failed (retrying every second): %s", exc)
                self.last_error = str(exc)
                pending = True
                self._stop.wait(1.0)
                continue
            if pending:
                log.info("peer reconcile works again")
            pending = False
            self.last_error = None
            last_full = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._feed is not None:
            self._feed.close()


__all__ = [
    "FULL_EVERY",
    "Applied",
    "PeerDiff",
    "PeerReconciler",
    "desired_peer",
    "diff",
    "owns",
]
