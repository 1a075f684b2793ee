"""The server device's book of peers (devicewatch.SwappableDevice.booked), which lets the peer
reconciler compare the store with the device without reading every peer back.

The device underneath is a stand-in recording what it was told: the book must follow any
device, and a write that fails half-way (which wireguard-go does not do on demand) must make
the book unknown rather than wrong."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from gatekeeper.server.devicewatch import SwappableDevice
from gatekeeper.wireguard.backend import PeerConfig, PeerStats, WireGuardError
from gatekeeper.wireguard.keys import PrivateKey, PublicKey


class Recorded:
    def __init__(self) -> None:
        self.peers_held: dict[str, PeerConfig] = {}
        self.fail_after: int | None = None

    name = "gkbook0"

    def configure(self, private_key: PrivateKey, listen_port: int | None,
                  peers: Sequence[PeerConfig], *, replace_peers: bool = True) -> None:  # fmt: skip
        if replace_peers:
            self.peers_held.clear()
        self.set_peers(peers)

    def set_peer(self, peer: PeerConfig) -> None:
        self.set_peers([peer])

    def set_peers(self, peers: Sequence[PeerConfig]) -> None:
        for n, p in enumerate(peers):
            if self.fail_after is not None and n >= self.fail_after:
                raise WireGuardError("UAPI set failed half-way")
            key = p.public_key.base64()
            if not p.update_only or key in self.peers_held:
                self.peers_held[key] = p

    def remove_peer(self, public_key: PublicKey) -> None:
        self.peers_held.pop(public_key.base64(), None)

    def peers(self) -> list[PeerStats]:
        return [
            PeerStats(p.public_key, None, None, 0, 0, tuple(p.allowed_ips))
            for p in self.peers_held.values()
        ]

    def last_handshakes(self) -> list[float | None]:
        return [None] * len(self.peers_held)


def peer(n: int, *, update_only: bool = False) -> PeerConfig:
    key = PrivateKey.generate().public_key()
    net = ipaddress.IPv6Network(f"fdae:41e4:649b:9303::{n:x}/128")
    return PeerConfig(public_key=key, allowed_ips=(net,), update_only=update_only)


def truth(dev: Recorded) -> dict[str, tuple[object, ...]]:
    return {k: tuple(p.allowed_ips) for k, p in dev.peers_held.items()}


def test_the_book_follows_sets_removals_and_updates() -> None:
    under = Recorded()
    dev = SwappableDevice(under)  # type: ignore[arg-type]
    dev.configure(PrivateKey.generate(), 51820, [], replace_peers=True)
    a, b, c = peer(1), peer(2), peer(3)
    dev.set_peers([a, b])
    dev.set_peer(c)
    dev.remove_peer(b.public_key)
    dev.set_peer(peer(4, update_only=True))  # not on the device: not created, not booked
    assert dev.booked() == truth(under)
    assert set(truth(under)) == {a.public_key.base64(), c.public_key.base64()}


def test_a_write_that_failed_half_way_makes_the_book_unknown_until_a_full_read() -> None:
    under = Recorded()
    dev = SwappableDevice(under)  # type: ignore[arg-type]
    under.fail_after = 1
    with pytest.raises(WireGuardError):
        dev.set_peers([peer(1), peer(2)])
    assert dev.booked() is None
    dev.peers()  # a read by anyone else does not renew it
    assert dev.booked() is None
    dev.rebook(dev.peers())  # the reconciler's full read does
    assert dev.booked() == truth(under) and len(truth(under)) == 1


def test_a_new_device_underneath_makes_the_book_unknown() -> None:
    dev = SwappableDevice(Recorded())  # type: ignore[arg-type]
    dev.set_peer(peer(1))
    dev.current = Recorded()  # type: ignore[assignment]
    assert dev.booked() is None
