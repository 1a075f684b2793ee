"""The WireGuard device as the reconciled result of the registry (docs/registry.md).

One code path puts the device in line with the store: startup restore, the device's
re-creation, `gatekeeper machines remove` (from any host, against a shared registry) and other
instances' provisions all end here. The rules (`diff`, `desired_peer`) are pure; `PeerReconciler`
is the thin adapter that reads the store and the device and applies the difference, and must be
called off the event loop (it does store and UAPI calls).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from gatekeeper.server.provisioning import SERVER_KEEPALIVE
from gatekeeper.server.registry import MachineRecord, Registry
from gatekeeper.wireguard.backend import Device, PeerConfig, PeerStats
from gatekeeper.wireguard.keys import PublicKey

log = logging.getLogger(__name__)

# How often the store's change marker is read: a removal from any host reaches this device
# within about this long (the goal is 2 s, docs/registry.md).
POLL_EVERY = 1.0
# A full reconcile even when the marker did not move: catches what the marker cannot see
# (a peer someone removed with `wg set` by hand, an update with an older clock).
FULL_EVERY = 60.0


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
    # Records whose peer the device lacks, or holds with other allowed IPs.
    add: tuple[MachineRecord, ...]
    # Device peers no record names.
    remove: tuple[PublicKey, ...]
    # The overlay addresses the removed peers held (their tunnel names are revoked too).
    removed_addresses: tuple[ipaddress.IPv6Address, ...]

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def diff(
    records: Iterable[MachineRecord],
    device_peers: Iterable[PeerStats],
    *,
    in_flight: Collection[str] = (),
) -> PeerDiff:
    """What to change so the device holds exactly one peer per record.

    A peer that matches its record (same key, same allowed IPs) is left alone: setting it
    again would replace the endpoint its live session learned. Keys in `in_flight` are being
    provisioned right now: Provision puts the peer on the device before its claim commits, so
    the reconciler must neither remove nor add them until the claim has settled.
    """
    wanted = {r.public_key: r for r in records}
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


def desired_peers(
    records: Iterable[MachineRecord], endpoint_of: Callable[[MachineRecord], str | None]
) -> dict[str, PeerConfig]:
    """Every record's peer by base64 key, endpoints from `endpoint_of` (the restore rules:
    the last UDP endpoint unless --disable-last-endpoint, a tunnel's relay socket)."""
    return {r.public_key: desired_peer(r, endpoint_of(r)) for r in records}


@dataclass(frozen=True)
class Applied:
    added: int
    removed: int


class PeerReconciler:
    """Converges one device to the registry. Thread-safe; call it from a worker thread."""

    def __init__(
        self,
        registry: Registry,
        device: Device,
        *,
        endpoint_of: Callable[[MachineRecord], str | None],
        forget_address: Callable[[ipaddress.IPv6Address], None],
        in_flight: Callable[[], Collection[str]] = lambda: (),
    ) -> None:
        self.registry = registry
        self.device = device
        self.endpoint_of = endpoint_of
        self.forget_address = forget_address
        self.in_flight = in_flight
        # Two reconciles at once (the poll and a DeviceWatch repair) would read the same
        # device state and both add the same peers; one at a time is enough.
        self._lock = threading.Lock()

    def reconcile(self) -> Applied:
        with self._lock:
            # The in-flight set is read before the store: a claim that commits in between is
            # then either still in flight (skipped) or already visible in the records.
            busy = frozenset(self.in_flight())
            records = self.registry.machines()
            change = diff(records, self.device.peers(), in_flight=busy)
            if change.add:
                self.device.set_peers(list(desired_peers(change.add, self.endpoint_of).values()))
            for key in change.remove:
                self.device.remove_peer(key)
            for address in change.removed_addresses:
                self.forget_address(address)
            if change:
                log.info(
                    "WireGuard peers reconciled with the registry: %d added, %d removed",
                    len(change.add),
                    len(change.remove),
                )
            return Applied(added=len(change.add), removed=len(change.remove))

    async def run(self, *, every: float = POLL_EVERY, full_every: float = FULL_EVERY) -> None:
        """Reconcile whenever the store's change marker moves, and every `full_every` anyway.

        Store and device calls run in a worker thread: never on the loop that carries traffic.
        """
        marker: tuple[int, float] | None = None
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(every)
            try:
                now = await asyncio.to_thread(self.registry.change_marker)
                due = time.monotonic() - last_full >= full_every
                if now != marker or due:
                    await asyncio.to_thread(self.reconcile)
                    # Taken before the reconcile's read: a change racing it is seen next time.
                    marker, last_full = now, time.monotonic()
            except Exception as exc:  # a store outage must not end the loop
                log.warning("peer reconcile failed: %s", exc)


__all__ = [
    "FULL_EVERY",
    "POLL_EVERY",
    "Applied",
    "PeerDiff",
    "PeerReconciler",
    "desired_peer",
    "desired_peers",
    "diff",
]
