"""The behaviour every WireGuard backend must show, as checks any test runner can call.

Each check takes a backend and an interface name that is free in the current network
namespace, creates its own device there, and closes it again even when it fails. A check
raises ContractViolation (an AssertionError) naming what differed. tests/ runs them against
wireguard-go in a lab namespace; a VM with kernel WireGuard runs the same list:

    for check in CHECKS:
        check(backend, "gkc0")

No pytest here: this module also runs where only the package is installed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence

from gatekeeper.wireguard import iplink
from gatekeeper.wireguard.backend import Backend, Device, PeerConfig, WireGuardError
from gatekeeper.wireguard.keys import PrivateKey, PublicKey

Check = Callable[[Backend, str], None]


class ContractViolation(AssertionError):
    """A backend behaved differently from what the Device protocol promises."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def _key() -> PublicKey:
    return PrivateKey.generate().public_key()


def _free_udp_port() -> int:
    """A UDP port nobody in this namespace uses right now (both families, like WireGuard)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _device(backend: Backend, ifname: str, **kwargs: int) -> Iterator[Device]:
    device = backend.create(ifname, **kwargs)
    try:
        yield device
    finally:
        device.close()


def _keys(device: Device) -> set[PublicKey]:
    return {p.public_key for p in device.peers()}


def _global_addresses(ifname: str) -> set[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    info = iplink.link_info(ifname)
    _expect(info is not None, f"{ifname} vanished")
    assert info is not None
    return {a for a in info.addresses if not (a.version == 6 and a.ip.is_link_local)}


def check_create_and_close(backend: Backend, ifname: str) -> None:
    device = backend.create(ifname, mtu=1400)
    try:
        _expect(device.name == ifname, f"device.name is {device.name!r}, not {ifname!r}")
        info = iplink.link_info(ifname)
        _expect(info is not None, f"create({ifname!r}) made no link in this namespace")
        assert info is not None
        _expect(info.mtu == 1400, f"MTU is {info.mtu}, asked for 1400")
        _expect(device.peers() == [], "a new device has peers")
    finally:
        device.close()
    _expect(not iplink.link_exists(ifname), f"close() left the link {ifname}")
    device.close()  # a second close is harmless


def check_default_mtu_is_1280(backend: Backend, ifname: str) -> None:
    with _device(backend, ifname):
        info = iplink.link_info(ifname)
        _expect(info is not None and info.mtu == 1280, f"default MTU is not 1280: {info}")


def check_fixed_listen_port(backend: Backend, ifname: str) -> None:
    port = _free_udp_port()
    with _device(backend, ifname) as device:
        device.configure(PrivateKey.generate(), port, [])
        _expect(device.listen_port() == port, f"listen_port() {device.listen_port()} != {port}")
        device.set_addresses([ipaddress.ip_interface("fd00:c0::1/64")])
        _expect(device.listen_port() == port, "the port changed when the link came up")


def check_random_listen_port_is_reported(backend: Backend, ifname: str) -> None:
    with _device(backend, ifname) as device:
        device.configure(PrivateKey.generate(), None, [])
        device.set_addresses([ipaddress.ip_interface("fd00:c0::1/64")])
        port = device.listen_port()
        _expect(0 < port < 65536, f"listen_port() is {port} for a device asked for any port")
        device.configure(PrivateKey.generate(), None, [])
        _expect(device.listen_port() == port, "configure(listen_port=None) moved the port")


def check_listen_port_in_use_is_a_wireguard_error(backend: Backend, ifname: str) -> None:
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as busy,
        _device(backend, ifname) as device,
    ):
        busy.bind(("::", 0))
        port = busy.getsockname()[1]
        try:
            device.configure(PrivateKey.generate(), port, [])
        except WireGuardError as exc:
            _expect(str(port) in str(exc), f"the error does not name port {port}: {exc}")
            _expect("\n" not in str(exc), f"the error is not one line: {exc!r}")
        else:
            raise ContractViolation(f"configure on busy port {port} did not fail")


def check_configure_replaces_or_merges_peers(backend: Backend, ifname: str) -> None:
    a, b, c = _key(), _key(), _key()
    key = PrivateKey.generate()
    with _device(backend, ifname) as device:
        device.configure(
            key,
            None,
            [PeerConfig(a, (_net("fd00::a/128"),)), PeerConfig(b, (_net("fd00::b/128"),))],
        )
        _expect(_keys(device) == {a, b}, "configure did not install both peers")
        device.configure(key, None, [PeerConfig(c, (_net("fd00::c/128"),))])
        _expect(_keys(device) == {c}, "configure(replace_peers=True) kept old peers")
        device.configure(key, None, [PeerConfig(a, (_net("fd00::a/128"),))], replace_peers=False)
        _expect(_keys(device) == {a, c}, "configure(replace_peers=False) dropped peers")


def check_set_peer_replaces_allowed_ips_and_keepalive(backend: Backend, ifname: str) -> None:
    a = _key()
    with _device(backend, ifname) as device:
        device.configure(PrivateKey.generate(), None, [])
        device.set_peer(
            PeerConfig(
                a,
                (_net("fd00::a/128"), _net("10.0.0.0/24")),
                endpoint="[fd00:c1::2]:51820",
                persistent_keepalive=25,
            )
        )
        (peer,) = device.peers()
        _expect(
            set(peer.allowed_ips) == {_net("fd00::a/128"), _net("10.0.0.0/24")},
            f"allowed IPs are {peer.allowed_ips}",
        )
        _expect(peer.endpoint == "[fd00:c1::2]:51820", f"endpoint is {peer.endpoint!r}")
        _expect(peer.persistent_keepalive == 25, f"keepalive is {peer.persistent_keepalive}")
        _expect(peer.last_handshake is None, "a peer that never met us has a handshake time")
        _expect(peer.rx_bytes == 0, f"rx_bytes is {peer.rx_bytes} before any traffic")
        device.set_peer(PeerConfig(a, (_net("fd00::aa/128"),)))
        (peer,) = device.peers()
        _expect(peer.allowed_ips == (_net("fd00::aa/128"),), "set_peer added to allowed IPs")
        _expect(peer.persistent_keepalive is None, "set_peer without keepalive kept it")
        _expect(peer.endpoint == "[fd00:c1::2]:51820", "set_peer without endpoint dropped it")


def check_set_peers_in_bulk(backend: Backend, ifname: str) -> None:
    first = _key()
    bulk = [
        PeerConfig(_key(), (ipaddress.IPv6Network((0xFD00 << 112 | n + 1, 128)),))
        for n in range(300)
    ]
    with _device(backend, ifname) as device:
        device.configure(PrivateKey.generate(), None, [PeerConfig(first, ())])
        device.set_peers(bulk)
        device.set_peers([])
        keys = _keys(device)
        _expect(keys == {first} | {p.public_key for p in bulk}, f"{len(keys)} peers, not 301")
        times = device.last_handshakes()
        _expect(times == [None] * 301, f"last_handshakes: {len(times)} entries, not 301 Nones")


def check_remove_peer(backend: Backend, ifname: str) -> None:
    a, b = _key(), _key()
    with _device(backend, ifname) as device:
        device.configure(PrivateKey.generate(), None, [PeerConfig(a, ()), PeerConfig(b, ())])
        device.remove_peer(a)
        _expect(_keys(device) == {b}, "remove_peer did not remove exactly that peer")
        device.remove_peer(a)  # unknown peer: no-op
        device.remove_peer(_key())
        _expect(_keys(device) == {b}, "removing an unknown peer changed the device")


def check_update_only_never_creates_a_peer(backend: Backend, ifname: str) -> None:
    a, gone = _key(), _key()
    net = (_net("fd00::a/128"),)
    with _device(backend, ifname) as device:
        device.configure(PrivateKey.generate(), None, [PeerConfig(a, net)])
        device.set_peers(
            [
                PeerConfig(a, net, persistent_keepalive=25, update_only=True),
                PeerConfig(gone, (_net("fd00::b/128"),), persistent_keepalive=25, update_only=True),
            ]
        )
        stats = {s.public_key: s for s in device.peers()}
        _expect(set(stats) == {a}, "update_only created a peer the device did not have")
        _expect(stats[a].persistent_keepalive == 25, "update_only did not update an existing peer")


def check_set_addresses_is_exact(backend: Backend, ifname: str) -> None:
    first: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = [
        ipaddress.IPv6Interface("fd00:c2::1/64"),
        ipaddress.IPv4Interface("10.99.0.1/24"),
    ]
    second = [ipaddress.IPv6Interface("fd00:c3::1/64")]
    with _device(backend, ifname) as device:
        device.set_addresses(first)
        info = iplink.link_info(ifname)
        _expect(info is not None and info.up, "set_addresses did not bring the link up")
        _expect(_global_addresses(ifname) == set(first), f"addresses: {_global_addresses(ifname)}")
        device.set_addresses(first)  # idempotent
        device.set_addresses(second)
        _expect(_global_addresses(ifname) == set(second), "old addresses were not removed")


_CRASHING_RUN = """
import sys, time
from gatekeeper.wireguard.select import select_backend
backend, _ = select_backend(sys.argv[1])
device = backend.create(sys.argv[2])
print("ready", flush=True)
time.sleep(120)
"""


def check_create_takes_over_a_crashed_runs_leftover(backend: Backend, ifname: str) -> None:
    """What a run killed with SIGKILL left (its link, its wireguard-go) does not block create."""
    # Started from this thread, so the child is in the same network namespace.
    crashed = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_RUN, backend.name, ifname],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert crashed.stdout is not None
        _expect(crashed.stdout.readline().strip() == b"ready", "the crashing run did not start")
        crashed.kill()
        crashed.wait(10)
        _expect(iplink.link_exists(ifname), "nothing was left behind to take over")
        with _device(backend, ifname) as device:
            device.configure(PrivateKey.generate(), None, [PeerConfig(_key(), ())])
            _expect(len(device.peers()) == 1, "the new device does not work")
    finally:
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait(10)
    _expect(not iplink.link_exists(ifname), "the link survived close()")


def check_bad_interface_name(backend: Backend, ifname: str) -> None:
    for bad in ("", "x" * 16, "a/b", "a b"):
        try:
            backend.create(bad).close()
        except WireGuardError as exc:
            _expect("\n" not in str(exc), f"the error is not one line: {exc!r}")
        else:
            raise ContractViolation(f"create({bad!r}) did not fail")


CHECKS: tuple[Check, ...] = (
    check_create_and_close,
    check_default_mtu_is_1280,
    check_fixed_listen_port,
    check_random_listen_port_is_reported,
    check_listen_port_in_use_is_a_wireguard_error,
    check_configure_replaces_or_merges_peers,
    check_set_peer_replaces_allowed_ips_and_keepalive,
    check_set_peers_in_bulk,
    check_remove_peer,
    check_update_only_never_creates_a_peer,
    check_set_addresses_is_exact,
    check_create_takes_over_a_crashed_runs_leftover,
    check_bad_interface_name,
)
