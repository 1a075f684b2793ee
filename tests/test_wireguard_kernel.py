"""The kernel backend's netlink messages, and what selection says on a kernel without WireGuard.

The messages are checked by decoding them as the kernel would see them; the backend against a
real kernel module runs in the VM (vm-tests), since this host's kernel has no WireGuard.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from pyroute2.netlink.generic.wireguard import (
    WGDEVICE_F_REPLACE_PEERS,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    wgmsg,
)

from gatekeeper.wireguard import select
from gatekeeper.wireguard.backend import PeerConfig, WireGuardError
from gatekeeper.wireguard.kernel import KernelBackend, parse_device, set_messages
from gatekeeper.wireguard.keys import PrivateKey, PublicKey


def _key() -> PublicKey:
    return PrivateKey.generate().public_key()


def _wire(messages: list[wgmsg], edit: Any = None) -> list[wgmsg]:
    """Encode each message to bytes and decode it again, as the other end of the socket does."""
    decoded = []
    for msg in messages:
        msg["header"]["type"] = 0x20
        if edit is not None:
            edit(msg)
        msg.encode()
        back = wgmsg(msg.data)
        back.decode()
        decoded.append(back)
    return decoded


def _peers(msg: wgmsg) -> list[Any]:
    return list(msg.get_attr("WGDEVICE_A_PEERS") or [])


def test_configure_message_carries_key_port_replace_flag_and_peers() -> None:
    key = PrivateKey.generate()
    peer = PeerConfig(
        _key(),
        (ipaddress.ip_network("fd00::a/128"), ipaddress.ip_network("10.1.0.0/16")),
        endpoint="[fd00:c1::2]:51820",
        persistent_keepalive=25,
    )
    (msg,) = _wire(
        set_messages(9, private_key=key, listen_port=4242, replace_peers=True, peers=[peer])
    )
    assert msg.get_attr("WGDEVICE_A_IFINDEX") == 9
    assert msg.get_attr("WGDEVICE_A_LISTEN_PORT") == 4242
    assert msg.get_attr("WGDEVICE_A_FLAGS") == WGDEVICE_F_REPLACE_PEERS
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY").decode() == key.base64()
    (wire_peer,) = _peers(msg)
    assert wire_peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert wire_peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    endpoint = wire_peer.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["addr"], endpoint["port"]) == ("fd00:c1::2", 51820)
    assert parse_device([msg]).peers[0].allowed_ips == peer.allowed_ips


def test_set_peer_without_keepalive_turns_it_off_and_keeps_the_endpoint() -> None:
    (msg,) = _wire(set_messages(3, peers=[PeerConfig(_key(), ())]))
    (wire_peer,) = _peers(msg)
    assert wire_peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 0
    assert wire_peer.get_attr("WGPEER_A_ENDPOINT") is None
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY") is None
    assert msg.get_attr("WGDEVICE_A_FLAGS") is None


def test_update_only_is_flagged_on_every_part_of_the_peer() -> None:
    many_ips = tuple(ipaddress.IPv6Network((0xFD << 120 | n, 128)) for n in range(3000))
    peer = PeerConfig(_key(), many_ips, persistent_keepalive=25, update_only=True)
    parts = [p for m in _wire(set_messages(3, peers=[peer])) for p in _peers(m)]
    assert len(parts) > 1
    assert parts[0].get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS | WGPEER_F_UPDATE_ONLY
    # A later part alone must not create the peer either.
    assert [p.get_attr("WGPEER_A_FLAGS") for p in parts[1:]] == [WGPEER_F_UPDATE_ONLY] * (
        len(parts) - 1
    )


def test_remove_sends_only_the_key_and_the_remove_flag() -> None:
    gone = _key()
    (msg,) = _wire(set_messages(3, remove=[gone]))
    (wire_peer,) = _peers(msg)
    assert wire_peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert wire_peer.get_attr("WGPEER_A_ALLOWEDIPS") is None


def test_large_sets_split_into_messages_that_fit_and_replace_only_once() -> None:
    many_ips = tuple(ipaddress.IPv6Network((0xFD << 120 | n, 128)) for n in range(3000))
    peers = [PeerConfig(_key(), many_ips)] + [
        PeerConfig(_key(), (ipaddress.IPv6Network((0xFD01 << 112 | n, 128)),)) for n in range(700)
    ]
    raw = set_messages(5, replace_peers=True, listen_port=1, peers=peers)
    messages = _wire(raw)
    assert len(messages) > 1
    assert all(len(m.data) < 60_000 for m in raw)
    assert [m.get_attr("WGDEVICE_A_FLAGS") for m in messages].count(WGDEVICE_F_REPLACE_PEERS) == 1
    assert messages[0].get_attr("WGDEVICE_A_LISTEN_PORT") == 1
    assert all(m.get_attr("WGDEVICE_A_LISTEN_PORT") is None for m in messages[1:])
    # The first peer's allowed IPs continue in later messages without replacing again.
    first_key = peers[0].public_key.base64().encode()
    parts = [
        p for m in messages for p in _peers(m) if p.get_attr("WGPEER_A_PUBLIC_KEY") == first_key
    ]
    assert len(parts) > 1
    assert [p.get_attr("WGPEER_A_FLAGS") for p in parts[1:]] == [None] * (len(parts) - 1)
    dump = parse_device(messages)
    assert [p.public_key for p in dump.peers] == [p.public_key for p in peers]
    assert dump.peers[0].allowed_ips == many_ips


def test_dump_reads_handshake_counters_endpoint_and_port() -> None:
    peer = PeerConfig(_key(), (ipaddress.ip_network("fd00::1/128"),), endpoint="192.0.2.7:51820")
    quiet = PeerConfig(_key(), ())

    def as_kernel_reply(msg: wgmsg) -> None:
        first = msg.get_attr("WGDEVICE_A_PEERS")[0]["attrs"]
        first += [
            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1_700_000_000, "tv_nsec": 500_000_000}],
            ["WGPEER_A_RX_BYTES", 1234],
            ["WGPEER_A_TX_BYTES", 5678],
        ]
        for part in msg.get_attr("WGDEVICE_A_PEERS")[1:]:
            part["attrs"] += [["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}]]

    dump = parse_device(
        _wire(set_messages(2, listen_port=51821, peers=[peer, quiet]), as_kernel_reply)
    )
    assert dump.listen_port == 51821
    active, idle = dump.peers
    assert active.last_handshake == pytest.approx(1_700_000_000.5)
    assert (active.rx_bytes, active.tx_bytes) == (1234, 5678)
    assert active.endpoint == "192.0.2.7:51820"
    assert active.persistent_keepalive is None
    assert idle.last_handshake is None and idle.endpoint is None


@pytest.mark.parametrize("endpoint", ["example.org:51820", "[fd00::1]", "1.2.3.4:0", "1.2.3.4:x"])
def test_endpoint_must_be_an_ip_literal_with_a_port(endpoint: str) -> None:
    with pytest.raises(WireGuardError, match="not an IP literal"):
        set_messages(1, peers=[PeerConfig(_key(), (), endpoint=endpoint)])


@pytest.mark.parametrize(("ifname", "mtu"), [("", 1280), ("x" * 16, 1280), ("wg0", 1000)])
def test_bad_name_or_mtu_is_refused_before_touching_the_kernel(ifname: str, mtu: int) -> None:
    with pytest.raises(WireGuardError) as failure:
        KernelBackend().create(ifname, mtu=mtu)
    assert "\n" not in str(failure.value)


def test_selection_on_a_kernel_without_wireguard_says_why() -> None:
    available, _ = select.kernel_wireguard()
    if available:
        pytest.skip("this kernel has WireGuard: the VM tests cover the kernel backend")
    with pytest.raises(WireGuardError, match="kernel WireGuard not available"):
        select.select_backend("kernel")
    backend, reason = select.select_backend("auto")
    assert backend.name == "userspace"
    assert "kernel WireGuard not available" in reason and "userspace" in reason
