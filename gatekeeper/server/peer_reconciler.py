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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from gatekeeper.netaddr import host_network
from gatekeeper.server.provisioning import SERVER_KEEPALIVE
from gatekeeper.server.registry import ChangeFeed, MachineRecord, Registry
from gatekeeper.wireguard.backend import Device, IPNetwork, PeerConfig, PeerStats
from gatekeeper.wireguard.keys import PublicKey

log = logging.getLogger(__name__)

# A pass that reads every peer back from the device even when the feed stayed quiet: catches
# what no feed can see (a peer someone removed with `wg set` by hand, a notification lost with
# its connection). At 10,000 peers a full read costs about 0.8 s of CPU: as rare as the
# server's idle endpoint sync (app.py), which reads them all too.
FULL_EVERY = 300.0
# Passes after a change are at least this far apart: a provision storm's many commits are
# read a few times, not once each (a removal still reaches the device well within 2 s).
MIN_GAP = 0.25


def owns(record: MachineRecord, instance: str) -> bool:
    """A record written before owners existed (None) is anyone's until a heartbeat takes it."""
    return record.owner is None or record.owner == instance


def _allowed(record: MachineRecord) -> tuple[ipaddress.IPv6Network, ...]:
    # A machine's own /128 only: machines never reach each other through the server.
    return (host_network(record.address),)


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
    held: Mapping[str, tuple[IPNetwork, ...]],
    *,
    instance: str,
) -> PeerDiff:
    """What to change so the device, which holds `held` (base64 key -> allowed IPs), holds
    exactly one peer per record `instance` owns.

    A peer that matches its record (same key, same allowed IPs) is left alone: setting it
    again would replace the endpoint its live session learned.
    """
    wanted = {r.public_key: r for r in records if owns(r, instance)}
    add = tuple(
        r for key, r in wanted.items() if key not in held or set(held[key]) != set(_allowed(r))
    )
    gone = [key for key in held if key not in wanted]
    addresses = tuple(
        net.network_address
        for key in gone
        for net in held[key]
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen == 128
    )
    return PeerDiff(
        add=add, remove=tuple(PublicKey.from_base64(k) for k in gone), removed_addresses=addresses
    )


def held_by(peers: Iterable[PeerStats]) -> dict[str, tuple[IPNetwork, ...]]:
    """A device read as `diff` takes it."""
    return {p.public_key.base64(): tuple(p.allowed_ips) for p in peers}


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
        endpoints_of: Callable[[Sequence[MachineRecord]], list[str | None]],
        forget_addresses: Callable[[Sequence[ipaddress.IPv6Address]], None],
        lock: threading.Lock | None = None,
        booked: Callable[[], Mapping[str, tuple[IPNetwork, ...]] | None] = lambda: None,
        rebook: Callable[[Sequence[PeerStats]], None] = lambda _stats: None,
    ) -> None:
        self.registry = registry
        self.booked = booked
        self.rebook = rebook
        self.device = device
        self.instance = instance
        self.endpoints_of = endpoints_of
        self.forget_addresses = forget_addresses
        # Provisioner.device_lock: a pass never runs while a Provision batch applies its peers
        # and claims (why: there). It also keeps two passes (the feed's and a DeviceWatch
        # repair) from reading the same device state and both adding the same peers.
        self._lock = lock or threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._feed: ChangeFeed | None = None
        self.passes = 0
        self.last_error: str | None = None

    def reconcile(self, *, full: bool = True, keys: frozenset[str] | None = None) -> Applied:
        """One pass. `full`: read every peer from the device (at start, after a re-creation,
        and every FULL_EVERY); otherwise compare with the book of peers this process set
        (SwappableDevice.booked) when there is one. `keys`: only these machines' peers may
        have changed (the change feed said so): read only their records."""
        with self._lock:
            held = None if full else self.booked()
            if held is None:
                stats = self.device.peers()
                self.rebook(stats)
                held = held_by(stats)
                keys = None  # the whole device was read: compare it with the whole store
            if keys is None:
                records = self.registry.machines()
            else:
                records = self.registry.machines_matching(public_keys=keys)
                held = {k: v for k, v in held.items() if k in keys}
            change = diff(records, held, instance=self.instance)
            if change.add:
                endpoints = self.endpoints_of(change.add)
                self.device.set_peers(
                    [desired_peer(r, e) for r, e in zip(change.add, endpoints, strict=True)]
                )
            for key in change.remove:
                self.device.remove_peer(key)
            if change.removed_addresses:
                self.forget_addresses(change.removed_addresses)
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
        last_full = last_pass = time.monotonic()
        pending = False  # the last pass failed: try again without waiting for a change
        while not self._stop.is_set():
            left = max(0.0, full_every - (time.monotonic() - last_full))
            changed = feed.wait(0.0 if pending else min(left, 1.0))
            if self._stop.is_set():
                return
            if not (changed or pending or time.monotonic() - last_full >= full_every):
                continue
            full = changed is None or pending
            if changed is not None:
                # Several changes close together (a storm) are read once.
                self._stop.wait(max(0.0, MIN_GAP - (time.monotonic() - last_pass)))
                more = feed.wait(0.0)
                if more is not None:
                    changed = changed | more
            try:
                # After a failed pass the feed's keys of then are gone: read everything.
                keys = None if pending or changed is None else changed.keys
                self.reconcile(full=full, keys=keys)
                last_pass = time.monotonic()
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
            if full:
                last_full = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._feed is not None:
            self._feed.close()


__all__ = [
    "FULL_EVERY",
    "MIN_GAP",
    "Applied",
    "PeerDiff",
    "PeerReconciler",
    "desired_peer",
    "diff",
    "held_by",
    "owns",
]
