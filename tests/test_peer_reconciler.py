"""The peer reconciler's rules as a pure diff: no root, no network, no store, no device.
The device holds exactly the machines its instance owns (docs/registry.md, "Owners")."""

from __future__ import annotations

import ipaddress

from gatekeeper.server.peer_reconciler import desired_peer, diff, held_by, owns
from gatekeeper.server.provisioning import SERVER_KEEPALIVE
from gatekeeper.server.registry import MachineRecord
from gatekeeper.wireguard.backend import IPNetwork, PeerStats
from gatekeeper.wireguard.keys import PrivateKey, PublicKey

PREFIX = "fdae:41e4:649b:9303::"
ME = "srv-a"


def record(
    n: int, key: PublicKey, *, endpoint: str | None = None, owner: str | None = ME
) -> MachineRecord:
    return MachineRecord(
        machine_key=f"m{n}",
        node_uuid=f"uuid-{n}",
        address=ipaddress.IPv6Address(f"{PREFIX}{n:x}"),
        public_key=key.base64(),
        endpoint=endpoint,
        owner=owner,
    )


def held(*peers: tuple[PublicKey, str]) -> dict[str, tuple[IPNetwork, ...]]:
    """The device's peers as the reconciler reads them: a real device dump (PeerStats) goes
    through the same held_by."""
    return held_by(
        PeerStats(
            public_key=key,
            endpoint="[2001:db8::1]:5000",
            last_handshake=None,
            rx_bytes=0,
            tx_bytes=0,
            allowed_ips=(ipaddress.IPv6Network(f"{address}/128"),),
        )
        for key, address in peers
    )


def keys(n: int) -> list[PublicKey]:
    return [PrivateKey.generate().public_key() for _ in range(n)]


def test_missing_peers_are_added_and_unknown_ones_removed() -> None:
    a, b, c = keys(3)
    records = [record(1, a), record(2, b)]
    change = diff(records, held((a, f"{PREFIX}1"), (c, f"{PREFIX}3")), instance=ME)
    assert [r.public_key for r in change.add] == [b.base64()]
    assert change.remove == (c,)
    assert change.removed_addresses == (ipaddress.IPv6Address(f"{PREFIX}3"),)


def test_a_matching_live_peer_is_left_alone() -> None:
    # Re-setting it would replace the endpoint its session learned with the stored one.
    (a,) = keys(1)
    change = diff([record(1, a, endpoint="[2001:db8::9]:1")], held((a, f"{PREFIX}1")), instance=ME)
    assert not change
    assert change.add == () and change.remove == ()


def test_a_peer_with_other_allowed_ips_is_set_again() -> None:
    (a,) = keys(1)
    change = diff([record(1, a)], held((a, f"{PREFIX}99")), instance=ME)
    assert [r.machine_key for r in change.add] == ["m1"]
    assert change.remove == ()


def test_an_empty_registry_empties_the_device() -> None:
    a, b = keys(2)
    change = diff([], held((a, f"{PREFIX}1"), (b, f"{PREFIX}2")), instance=ME)
    assert set(change.remove) == {a, b}


def test_keepalive_only_with_an_endpoint() -> None:
    a, b = keys(2)
    with_endpoint = desired_peer(record(1, a), "[2001:db8::5]:51820")
    without = desired_peer(record(2, b), None)
    assert with_endpoint.persistent_keepalive == SERVER_KEEPALIVE
    assert with_endpoint.endpoint == "[2001:db8::5]:51820"
    assert without.persistent_keepalive is None and without.endpoint is None
    assert without.allowed_ips == (ipaddress.IPv6Network(f"{PREFIX}2/128"),)


def test_a_machine_owned_elsewhere_leaves_this_device() -> None:
    # It provisioned through another instance, or a survivor took it over: its session must
    # live on that instance's device only, or both would send to it.
    a, b = keys(2)
    records = [record(1, a, owner="srv-b"), record(2, b, owner="srv-b")]
    change = diff(records, held((a, f"{PREFIX}1")), instance=ME)
    assert change.add == ()
    assert change.remove == (a,)
    assert change.removed_addresses == (ipaddress.IPv6Address(f"{PREFIX}1"),)


def test_a_machine_taken_over_by_this_instance_is_added() -> None:
    (a,) = keys(1)
    change = diff([record(1, a, owner=ME)], held(), instance=ME)
    assert [r.machine_key for r in change.add] == ["m1"]
    assert not diff([record(1, a, owner=ME)], held(), instance="srv-b")


def test_records_from_before_owners_belong_to_whoever_reads_them() -> None:
    (a,) = keys(1)
    legacy = record(1, a, owner=None)
    assert owns(legacy, ME) and owns(legacy, "srv-b")
    assert not owns(record(1, a, owner="srv-b"), ME)
    assert [r.machine_key for r in diff([legacy], held(), instance=ME).add] == ["m1"]
