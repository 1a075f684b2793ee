"""wireguard-go devices in real namespaces: traffic, take-over, and the errors a user sees."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from gatekeeper.lab.netns import Lab, Namespace
from gatekeeper.lab.nsthread import NamespaceThread
from gatekeeper.wireguard import iplink
from gatekeeper.wireguard.backend import PeerConfig, WireGuardError
from gatekeeper.wireguard.keys import PrivateKey
from gatekeeper.wireguard.select import select_backend
from gatekeeper.wireguard.userspace import (
    INSTALL_HINT,
    UserspaceBackend,
    UserspaceDevice,
    missing_privilege,
    socket_path,
)

WG_PORT = 51820
UNDERLAY = ("fd00:a::1", "fd00:a::2")
OVERLAY = ("fd00:b::1", "fd00:b::2")


@dataclass
class Side:
    ns: Namespace
    inside: NamespaceThread
    key: PrivateKey
    device: UserspaceDevice


@pytest.fixture
def pair(lab: Lab) -> Iterator[tuple[Side, Side]]:
    """Two namespaces on a veth underlay, each with a wireguard-go device (no peers yet)."""
    a_ns, b_ns = lab.namespace("a"), lab.namespace("b")
    lab.veth(a_ns, f"{UNDERLAY[0]}/64", b_ns, f"{UNDERLAY[1]}/64")
    sides: list[Side] = []
    try:
        for ns, role in ((a_ns, "wa"), (b_ns, "wb")):
            inside = NamespaceThread(ns.name)
            try:
                device = inside.call(UserspaceBackend().create, lab.name(role))
            except BaseException:
                inside.close()
                raise
            sides.append(Side(ns, inside, PrivateKey.generate(), device))
        yield sides[0], sides[1]
    finally:
        for side in sides:
            side.inside.call(side.device.close)
            side.inside.close()


def _connect(a: Side, a_index: int, b: Side, b_index: int) -> None:
    peer = PeerConfig(
        b.key.public_key(),
        (ipaddress.IPv6Network(f"{OVERLAY[b_index]}/128"),),
        endpoint=f"[{UNDERLAY[b_index]}]:{WG_PORT}",
    )
    a.inside.call(a.device.configure, a.key, WG_PORT, [peer])
    a.inside.call(a.device.set_addresses, [ipaddress.IPv6Interface(f"{OVERLAY[a_index]}/64")])


def _ping(ns: Namespace, address: str, wait: int = 2) -> bool:
    argv = ns.exec_argv(["ping", "-6", "-c", "1", "-W", str(wait), address])
    return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.netns
def test_overlay_ping_stats_remove_and_close(pair: tuple[Side, Side]) -> None:
    a, b = pair
    _connect(a, 0, b, 1)
    _connect(b, 1, a, 0)

    assert _ping(a.ns, OVERLAY[1])

    (peer,) = a.inside.call(a.device.peers)
    assert peer.public_key == b.key.public_key()
    assert peer.last_handshake is not None and abs(peer.last_handshake - time.time()) < 30
    assert peer.rx_bytes > 0 and peer.tx_bytes > 0
    assert peer.endpoint == f"[{UNDERLAY[1]}]:{WG_PORT}"
    assert a.inside.call(a.device.listen_port) == WG_PORT

    a.inside.call(a.device.remove_peer, b.key.public_key())
    assert a.inside.call(a.device.peers) == []
    assert not _ping(a.ns, OVERLAY[1], wait=1)

    for side in (a, b):
        pid, name = side.device.pid, side.device.name
        side.inside.call(side.device.close)
        assert side.inside.call(iplink.link_info, name) is None
        assert _pid_gone(pid)
        assert not socket_path(name).exists()


@pytest.mark.netns
def test_works_from_inside_an_event_loop(lab: Lab) -> None:
    """The server calls the device from asyncio code; pyroute2 must not trip over the loop."""
    ns = lab.namespace("c")
    name = lab.name("wg")

    async def use() -> tuple[int, bool]:
        device = UserspaceBackend().create(name)
        try:
            device.configure(PrivateKey.generate(), None, [])
            device.set_addresses([ipaddress.IPv6Interface("fd00:c::1/64")])
            info = iplink.link_info(name)
            return device.listen_port(), info is not None and info.up
        finally:
            device.close()

    with NamespaceThread(ns.name) as inside:
        port, up = inside.call(asyncio.run, use())
    assert port > 0 and up


@pytest.mark.netns
def test_takes_over_after_a_crash(lab: Lab) -> None:
    """SIGKILLed wireguard-go leaves a stale socket; a persistent TUN of the name is reused."""
    ns = lab.namespace("c")
    name = lab.name("wg")
    with NamespaceThread(ns.name) as inside:
        crashed = inside.call(UserspaceBackend().create, name)
        os.kill(crashed.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while inside.call(iplink.link_exists, name):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert socket_path(name).exists()  # stale: nobody answers any more

        def persistent_tun() -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname=name, kind="tuntap", mode="tun", ifr={"no_pi": True})

        for leftover in (lambda: None, persistent_tun):
            inside.call(leftover)
            device = inside.call(UserspaceBackend().create, name)
            try:
                inside.call(device.configure, PrivateKey.generate(), None, [])
                assert inside.call(device.listen_port) > 0
            finally:
                inside.call(device.close)
            assert not inside.call(iplink.link_exists, name)
        inside.call(crashed.close)


@pytest.mark.netns
def test_refuses_to_delete_a_foreign_interface(lab: Lab) -> None:
    ns = lab.namespace("c")
    ns.run(["ip", "link", "add", "gkforeign0", "type", "veth", "peer", "name", "gkforeign1"])
    with (
        NamespaceThread(ns.name) as inside,
        pytest.raises(WireGuardError, match="already exists as a veth link"),
    ):
        inside.call(UserspaceBackend().create, "gkforeign0")
    assert "gkforeign0" in ns.run(["ip", "-br", "link"])


@pytest.mark.netns
def test_same_name_in_two_namespaces_is_explained(lab: Lab) -> None:
    """The UAPI socket directory is shared by all namespaces, so names must be unique."""
    first, second = lab.namespace("a"), lab.namespace("b")
    name = lab.name("wg")
    with NamespaceThread(first.name) as one, NamespaceThread(second.name) as two:
        device = one.call(UserspaceBackend().create, name)
        try:
            with pytest.raises(WireGuardError) as info:
                two.call(UserspaceBackend().create, name)
            assert "another wireguard-go already serves" in str(info.value)
            assert "private /run/wireguard" in str(info.value)
            assert one.call(device.listen_port) > 0  # the first device is untouched
        finally:
            one.call(device.close)


@pytest.mark.netns
def test_private_run_wireguard_allows_the_same_name(lab: Lab, tmp_path: Path) -> None:
    """With Namespace.exec_argv(private_wireguard_run=True), two machines share a name."""
    script = (
        "import sys\n"
        "from gatekeeper.wireguard.userspace import UserspaceBackend\n"
        "import time\n"
        "d = UserspaceBackend().create('gksame0')\n"
        # wireguard-go binds its random port when the TUN device comes up, just after its
        # UAPI socket answers: give it a moment.
        "deadline = time.monotonic() + 5\n"
        "while d.listen_port() == 0 and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "print(d.listen_port() > 0)\n"
        "d.close()\n"
    )
    for role in ("a", "b"):
        ns = lab.namespace(role)
        argv = ns.exec_argv([sys.executable, "-c", script], private_wireguard_run=True)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "True"


@pytest.mark.netns
def test_bulk_and_single_peer_updates_are_fast(lab: Lab) -> None:
    ns = lab.namespace("c")
    peers = [
        PeerConfig(
            PrivateKey.generate().public_key(),
            (ipaddress.IPv6Network((0xFD00 << 112 | n + 1, 128)),),
        )
        for n in range(1000)
    ]
    with NamespaceThread(ns.name) as inside:
        device = inside.call(UserspaceBackend().create, lab.name("wg"))
        try:
            started = time.monotonic()
            for peer in peers[:500]:
                device.set_peer(peer)
            single = time.monotonic() - started
            started = time.monotonic()
            device.set_peers(peers[500:])
            bulk = time.monotonic() - started
            assert len(device.peers()) == 1000
        finally:
            inside.call(device.close)
    # Measured about 0.15 s and 0.05 s; the bounds only catch an accidental O(n) per call.
    assert single < 5 and bulk < 2


@pytest.mark.netns
def test_refused_request_carries_wireguard_gos_reason(lab: Lab) -> None:
    ns = lab.namespace("c")
    with NamespaceThread(ns.name) as inside:
        device = inside.call(UserspaceBackend().create, lab.name("wg"))
        try:
            other = inside.call(UserspaceBackend().create, lab.name("w2"))
            try:
                inside.call(other.configure, PrivateKey.generate(), WG_PORT, [])
                with pytest.raises(WireGuardError) as info:
                    inside.call(device.configure, PrivateKey.generate(), WG_PORT, [])
            finally:
                inside.call(other.close)
        finally:
            inside.call(device.close)
    message = str(info.value)
    assert f"listen port {WG_PORT}" in message and "EADDRINUSE" in message
    assert "address already in use" in message  # wireguard-go's own words
    assert "\n" not in message


# --- errors that need no namespace --------------------------------------------------------------


def test_missing_wireguard_go_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WireGuardError) as info:
        UserspaceBackend().create("gkmissing0")
    assert str(info.value) == INSTALL_HINT
    assert str(info.value) == "wireguard-go not found: install the Debian package wireguard-go"
    with pytest.raises(WireGuardError, match=r"^wireguard-go not found: install"):
        select_backend("userspace")
    with pytest.raises(WireGuardError) as auto:
        select_backend("auto")
    assert str(auto.value).startswith("kernel WireGuard not available (")
    assert str(auto.value).endswith(INSTALL_HINT)


def test_select_backend_reasons() -> None:
    backend, reason = select_backend("auto")
    assert backend.name == "userspace"
    assert reason == (
        "kernel WireGuard not available (generic netlink family 'wireguard' missing); "
        "using userspace wireguard-go"
    )
    # This host's kernel has no WireGuard: forcing it says so and what to do instead.
    with pytest.raises(WireGuardError, match="load the wireguard module or use 'userspace'"):
        select_backend("kernel")
    with pytest.raises(WireGuardError, match="choose one of auto, kernel, userspace"):
        select_backend("fast")


@pytest.mark.parametrize(
    ("name", "complaint"),
    [("", "1 to 15 bytes"), ("a" * 16, "1 to 15 bytes"), ("..", "'.'"), ("a:b", "':'")],
)
def test_bad_names_and_mtus(name: str, complaint: str) -> None:
    with pytest.raises(WireGuardError, match=complaint):
        UserspaceBackend().create(name)
    with pytest.raises(WireGuardError, match=r"must be 1280\.\.65535"):
        UserspaceBackend().create("gkok0", mtu=576)


def test_early_exit_includes_the_tail_of_its_output(tmp_path: Path) -> None:
    """Whatever makes wireguard-go die at start-up, its last words reach the error."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the preflight checks CAP_NET_ADMIN before starting)")
    fake = tmp_path / "wireguard-go"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'INFO: (gkfake0) 2024/01/02 03:04:05 Starting wireguard-go version 0.0.0'\n"
        "echo 'ERROR: (gkfake0) 2024/01/02 03:04:05 Failed to create TUN device: "
        "operation not permitted' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    with pytest.raises(WireGuardError) as info:
        UserspaceBackend(str(fake)).create("gkfake0")
    assert str(info.value) == (
        "wireguard-go exited early (status 1) while creating gkfake0: "
        "Starting wireguard-go version 0.0.0 | "
        "Failed to create TUN device: operation not permitted"
    )


@pytest.mark.netns
def test_missing_cap_net_admin_is_explained(lab: Lab) -> None:
    ns = lab.namespace("c")
    script = (
        "from gatekeeper.wireguard.userspace import UserspaceBackend\n"
        "from gatekeeper.wireguard.backend import WireGuardError\n"
        "try:\n"
        "    UserspaceBackend().create('gknocap0')\n"
        "except WireGuardError as e:\n"
        "    print(e)\n"
    )
    argv = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    out = ns.run([*argv, sys.executable, "-c", script])
    assert out.strip() == (
        "creating a WireGuard interface needs CAP_NET_ADMIN, which this root process lacks "
        "(dropped by its container or service manager): grant CAP_NET_ADMIN"
    )


STATUS = "Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{eff}\nCapAmb:\t{amb}\n"
FULL, NONE, NET_ADMIN = "000001ffffffffff", "0000000000000000", "0000000000001000"


@pytest.mark.parametrize(
    ("eff", "amb", "euid", "file_caps", "problem"),
    [
        (FULL, NONE, 0, False, None),
        ("000001ffffffefff", NONE, 0, False, "this root process lacks"),
        (NONE, NONE, 1000, False, "run as root, or grant it as an ambient capability"),
        (NET_ADMIN, NET_ADMIN, 1000, False, None),
        (NONE, NONE, 1000, True, None),
    ],
)
def test_privilege_check(
    eff: str, amb: str, euid: int, file_caps: bool, problem: str | None
) -> None:
    found = missing_privilege(STATUS.format(eff=eff, amb=amb), euid, file_caps=file_caps)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "CAP_NET_ADMIN" in found
