"""The kernel backend's generic netlink codec, and what selection says on a kernel without
WireGuard.

Messages are checked by walking their bytes as the kernel does (attribute by attribute, with
`rtnl.attrs`) and by decoding dumps built by hand in the kernel's layout; the backend against
a real kernel module runs in the VM (vm-tests), since this host's kernel has no WireGuard.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Any

import pytest

from gatekeeper.wireguard import rtnl, select
from gatekeeper.wireguard.backend import PeerConfig, WireGuardError
from gatekeeper.wireguard.kernel import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WGDEVICE_A_IFINDEX,
    WGDEVICE_A_LISTEN_PORT,
    WGDEVICE_A_PEERS,
    WGPEER_A_ALLOWEDIPS,
    WGPEER_A_ENDPOINT,
    WGPEER_A_FLAGS,
    WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
    WGPEER_A_PUBLIC_KEY,
    KernelBackend,
    KernelDevice,
    decode_endpoint,
    get_message,
    parse_device,
    set_messages,
)
from gatekeeper.wireguard.keys import PrivateKey, PublicKey

Attrs = dict[int, bytes]


def _key() -> PublicKey:
    return PrivateKey.generate().public_key()


def _device(msg: bytes) -> tuple[int, int, Attrs]:
    """(command, version, attributes) of one payload; a repeated attribute would be a bug."""
    command, version, _ = struct.unpack_from("=BBH", msg)
    found: Attrs = {}
    for kind, value in rtnl.attrs(msg[4:]):
        assert kind not in found, f"attribute {kind} twice"
        found[kind] = value
    return command, version, found


def _peers(msg: bytes) -> list[Attrs]:
    peers = _device(msg)[2].get(WGDEVICE_A_PEERS, b"")
    return [dict(rtnl.attrs(body)) for _, body in rtnl.attrs(peers)]


def _raw_types(data: bytes) -> list[int]:
    """Each attribute's type with its flags (rtnl.attrs strips them)."""
    types, offset = [], 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        types.append(kind)
        offset += (length + 3) & ~3
    return types


def _u32(value: bytes | None) -> int | None:
    return None if value is None else int(struct.unpack("=I", value)[0])


def _u16(value: bytes | None) -> int | None:
    return None if value is None else int(struct.unpack("=H", value)[0])


# The flag values of include/uapi/linux/wireguard.h, written out so a wrong constant fails.
REPLACE_PEERS, REMOVE_ME, REPLACE_ALLOWEDIPS, UPDATE_ONLY = 1, 1, 2, 4


def test_configure_message_carries_key_port_replace_flag_and_peers() -> None:
    key = PrivateKey.generate()
    peer = PeerConfig(
        _key(),
        (ipaddress.ip_network("fd00::a/128"), ipaddress.ip_network("10.1.0.0/16")),
        endpoint="[fd00:c1::2]:51820",
        persistent_keepalive=25,
    )
    (msg,) = set_messages(9, private_key=key, listen_port=4242, replace_peers=True, peers=[peer])
    command, version, device = _device(msg)
    assert (command, version) == (WG_CMD_SET_DEVICE, 1) == (1, 1)
    assert _u32(device[WGDEVICE_A_IFINDEX]) == 9
    assert _u16(device[WGDEVICE_A_LISTEN_PORT]) == 4242
    assert _u32(device[5]) == REPLACE_PEERS
    assert device[3] == key.raw  # WGDEVICE_A_PRIVATE_KEY: 32 raw bytes
    (wire_peer,) = _peers(msg)
    assert wire_peer[WGPEER_A_PUBLIC_KEY] == peer.public_key.raw
    assert _u32(wire_peer[WGPEER_A_FLAGS]) == REPLACE_ALLOWEDIPS
    assert _u16(wire_peer[WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL]) == 25
    assert decode_endpoint(wire_peer[WGPEER_A_ENDPOINT]) == "[fd00:c1::2]:51820"
    # The nests carry NLA_F_NESTED, as the kernel's policy demands.
    assert _raw_types(msg[4:])[-1] == WGDEVICE_A_PEERS | 0x8000
    assert parse_device([msg]).peers[0].allowed_ips == peer.allowed_ips


def test_endpoint_is_a_sockaddr_with_the_port_in_network_order() -> None:
    (v4,) = _peers(set_messages(1, peers=[PeerConfig(_key(), (), endpoint="192.0.2.7:51820")])[0])
    raw4 = v4[WGPEER_A_ENDPOINT]
    assert len(raw4) == 16  # struct sockaddr_in
    assert struct.unpack_from("=H", raw4)[0] == socket.AF_INET
    assert raw4[2:4] == (51820).to_bytes(2, "big") and raw4[4:8] == bytes([192, 0, 2, 7])
    (v6,) = _peers(set_messages(1, peers=[PeerConfig(_key(), (), endpoint="[fd00::1]:8")])[0])
    raw6 = v6[WGPEER_A_ENDPOINT]
    assert len(raw6) == 28  # struct sockaddr_in6
    assert struct.unpack_from("=H", raw6)[0] == socket.AF_INET6
    assert raw6[2:4] == b"\0\x08" and raw6[8:24] == ipaddress.IPv6Address("fd00::1").packed
    assert decode_endpoint(raw4) == "192.0.2.7:51820"
    assert decode_endpoint(raw6) == "[fd00::1]:8"
    assert decode_endpoint(b"\0" * 16) is None  # AF_UNSPEC: no endpoint yet


def test_get_is_a_dump_request_naming_the_device_by_index() -> None:
    command, version, device = _device(get_message(7))
    assert (command, version) == (WG_CMD_GET_DEVICE, 1) == (0, 1)
    assert device == {WGDEVICE_A_IFINDEX: struct.pack("=I", 7)}


def test_set_peer_without_keepalive_turns_it_off_and_keeps_the_endpoint() -> None:
    (msg,) = set_messages(3, peers=[PeerConfig(_key(), ())])
    (wire_peer,) = _peers(msg)
    assert _u16(wire_peer[WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL]) == 0
    assert WGPEER_A_ENDPOINT not in wire_peer
    # An empty allowed-IP list with REPLACE_ALLOWEDIPS clears them.
    assert wire_peer[WGPEER_A_ALLOWEDIPS] == b""
    device = _device(msg)[2]
    assert 3 not in device and 5 not in device  # no private key, no flags


def test_update_only_is_flagged_on_every_part_of_the_peer() -> None:
    many_ips = tuple(ipaddress.IPv6Network((0xFD << 120 | n, 128)) for n in range(3000))
    peer = PeerConfig(_key(), many_ips, persistent_keepalive=25, update_only=True)
    parts = [p for m in set_messages(3, peers=[peer]) for p in _peers(m)]
    assert len(parts) > 1
    assert _u32(parts[0][WGPEER_A_FLAGS]) == REPLACE_ALLOWEDIPS | UPDATE_ONLY
    # A later part alone must not create the peer either.
    assert [_u32(p[WGPEER_A_FLAGS]) for p in parts[1:]] == [UPDATE_ONLY] * (len(parts) - 1)


def test_remove_sends_only_the_key_and_the_remove_flag() -> None:
    gone = _key()
    (msg,) = set_messages(3, remove=[gone])
    (wire_peer,) = _peers(msg)
    assert wire_peer == {
        WGPEER_A_PUBLIC_KEY: gone.raw,
        WGPEER_A_FLAGS: struct.pack("=I", REMOVE_ME),
    }


def test_large_sets_split_into_messages_that_fit_and_replace_only_once() -> None:
    many_ips = tuple(ipaddress.IPv6Network((0xFD << 120 | n, 128)) for n in range(3000))
    peers = [PeerConfig(_key(), many_ips)] + [
        PeerConfig(_key(), (ipaddress.IPv6Network((0xFD01 << 112 | n, 128)),)) for n in range(700)
    ]
    messages = set_messages(5, replace_peers=True, listen_port=1, peers=peers)
    assert len(messages) > 1
    # The peers nest's 16-bit length must hold: every message well under 64 KiB.
    assert all(len(m) < 60_000 for m in messages)
    devices = [_device(m)[2] for m in messages]
    assert [_u32(d.get(5)) for d in devices].count(REPLACE_PEERS) == 1
    assert _u16(devices[0][WGDEVICE_A_LISTEN_PORT]) == 1
    assert all(WGDEVICE_A_LISTEN_PORT not in d for d in devices[1:])
    assert all(_u32(d[WGDEVICE_A_IFINDEX]) == 5 for d in devices)
    # The first peer's allowed IPs continue in later messages without replacing again.
    first_key = peers[0].public_key.raw
    parts = [p for m in messages for p in _peers(m) if p[WGPEER_A_PUBLIC_KEY] == first_key]
    assert len(parts) > 1
    assert [p.get(WGPEER_A_FLAGS) for p in parts[1:]] == [None] * (len(parts) - 1)
    dump = parse_device(messages)
    assert [p.public_key for p in dump.peers] == [p.public_key for p in peers]
    assert dump.peers[0].allowed_ips == many_ips


def _nla(kind: int, value: bytes) -> bytes:
    """An attribute written out by hand (not with rtnl.attr), padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _allowed(family: int, address: bytes, mask: int) -> bytes:
    body = _nla(1, struct.pack("=H", family)) + _nla(2, address) + _nla(3, bytes([mask]))
    return _nla(0x8000, body)


def test_a_dump_split_over_messages_merges_a_peer_continued_in_the_next() -> None:
    """What the kernel sends for a device whose peers overflow one message: the second
    message starts with the first message's last peer again (its key, then more allowed IPs)."""
    active, quiet = _key(), _key()
    endpoint = (
        struct.pack("=H", socket.AF_INET)
        + (51820).to_bytes(2, "big")
        + bytes([192, 0, 2, 7])
        + b"\0" * 8
    )
    first_peer = _nla(
        0x8000,
        _nla(1, active.raw)
        + _nla(4, endpoint)
        + _nla(5, struct.pack("=H", 25))
        + _nla(6, struct.pack("=qq", 1_700_000_000, 500_000_000))
        + _nla(7, struct.pack("=Q", 1234))
        + _nla(8, struct.pack("=Q", 5678))
        + _nla(10, struct.pack("=I", 1))
        + _nla(0x8009, _allowed(socket.AF_INET6, bytes.fromhex("fd00" + "00" * 13 + "01"), 128)),
    )
    head = struct.pack("=BBH", 0, 1, 0)
    device = _nla(1, struct.pack("=I", 4)) + _nla(2, b"gk0\0") + _nla(6, struct.pack("=H", 51821))
    message_1 = head + device + _nla(0x8008, first_peer)
    continued = _nla(
        0x8000,
        _nla(1, active.raw) + _nla(0x8009, _allowed(socket.AF_INET, bytes([10, 9, 0, 0]), 16)),
    )
    idle = _nla(
        0x8000,
        _nla(1, quiet.raw)
        + _nla(4, b"\0" * 16)
        + _nla(6, struct.pack("=qq", 0, 0))
        + _nla(7, struct.pack("=Q", 0))
        + _nla(8, struct.pack("=Q", 0)),
    )
    message_2 = head + device + _nla(0x8008, continued + idle)
    dump = parse_device([message_1, message_2])
    assert dump.listen_port == 51821
    first, second = dump.peers
    assert first.public_key == active and second.public_key == quiet
    assert first.last_handshake == pytest.approx(1_700_000_000.5)
    assert (first.rx_bytes, first.tx_bytes) == (1234, 5678)
    assert first.endpoint == "192.0.2.7:51820"
    assert first.persistent_keepalive == 25
    assert first.allowed_ips == (
        ipaddress.ip_network("fd00::1/128"),
        ipaddress.ip_network("10.9.0.0/16"),
    )
    assert second.last_handshake is None and second.endpoint is None
    assert second.persistent_keepalive is None and second.allowed_ips == ()


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


class _ReloadingKernel:
    """Stands in for generic netlink, which this host has no WireGuard family in (the VM
    tests run the real one): WireGuard's family id, which moves when the module reloads, and
    what a request to a stale id gets (ENOENT)."""

    def __init__(self) -> None:
        self.family = 0x1A
        self.lookups = 0
        self.requests: list[int] = []

    def request(self, protocol: int, kind: int, flags: int, payload: bytes) -> list[Any]:
        assert protocol == rtnl.NETLINK_GENERIC
        if kind == rtnl._GENL_ID_CTRL:
            self.lookups += 1
            return [(kind, b"\0" * 4 + rtnl.attr(1, struct.pack("=H", self.family)))]
        self.requests.append(kind)
        if kind != self.family:
            raise rtnl.NetlinkError(errno.ENOENT)
        if payload[0] == WG_CMD_SET_DEVICE and b"bad" in payload:
            raise rtnl.NetlinkError(errno.EINVAL)
        return [(kind, payload)] if payload[0] == WG_CMD_GET_DEVICE else []


def test_the_family_is_looked_up_once_per_device_and_again_after_a_module_reload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel = _ReloadingKernel()
    monkeypatch.setattr(rtnl, "request", kernel.request)
    device = KernelDevice("gk-lite-wg0", 7)
    key = PrivateKey.generate()
    for _ in range(5):
        device.configure(key, 51820, [])
        device.dump()
    assert kernel.lookups == 1 and kernel.requests == [0x1A] * 10

    kernel.family = 0x1B  # rmmod + modprobe: the old id answers ENOENT
    device.dump()
    assert kernel.lookups == 2 and kernel.requests[10:] == [0x1A, 0x1B]
    device.dump()
    assert kernel.lookups == 2 and kernel.requests[12:] == [0x1B]


def test_an_error_of_the_request_itself_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _ReloadingKernel()
    monkeypatch.setattr(rtnl, "request", kernel.request)
    device = KernelDevice("gk-lite-wg0", 7)
    peer = PeerConfig(public_key=PublicKey(b"bad" * 10 + b"!!"), allowed_ips=())
    with pytest.raises(WireGuardError, match=r"^set peer \w+ on gk-lite-wg0: Invalid argument$"):
        device.set_peer(peer)
    # Looked up again to tell a stale id from a refusal, the same id came back: sent once.
    assert kernel.lookups == 2 and kernel.requests == [0x1A]
