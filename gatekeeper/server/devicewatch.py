"""The server's hold on its WireGuard interface: one server per interface, and a device that
comes back when something removes it.

- `InterfaceLock`: an flock on `/run/gatekeeper/wireguard-<netns>-<ifname>.lock`, held for the
  life of the server. A second server (another --state-dir, same --wireguard-interface, same
  network namespace) used to delete the first one's link as "left by an earlier run" and cut
  every machine off; now it refuses to start. A crashed server's lock goes with its process,
  so the interface it left is still taken over as before.
- `SwappableDevice`: the one Device everybody holds (provisioner, admin socket, metrics); the
  watch replaces what is behind it.
- `DeviceWatch`: checks every few seconds that the link still exists with the same index and
  that the device answers. When it vanished (`ip link del`, wireguard-go killed) it says so
  and recreates it: same key, port and address, every peer put back with its last endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gatekeeper.nslock import LOCK_DIR, LockHeld, NamespaceLock
from gatekeeper.wireguard import iplink
from gatekeeper.wireguard.backend import (
    Device,
    IPInterface,
    IPNetwork,
    PeerConfig,
    PeerStats,
    WireGuardError,
)
from gatekeeper.wireguard.keys import PrivateKey, PublicKey

log = logging.getLogger(__name__)

WATCH_EVERY = 2.0


class InterfaceInUse(RuntimeError):
    pass


class InterfaceLock:
    def __init__(self, ifname: str, directory: Path = LOCK_DIR) -> None:
        self.ifname = ifname
        self._lock = NamespaceLock(f"wireguard-{ifname}", directory)
        self.path = self._lock.path

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except LockHeld as exc:
            raise InterfaceInUse(
                f"interface {self.ifname} belongs to a running gatekeeper server"
                f"{f' (pid {exc.holder})' if exc.holder else ''} in this network namespace: "
                "choose another --wireguard-interface, or stop that server"
            ) from None

    def release(self) -> None:
        self._lock.release()


class SwappableDevice:
    """A Device whose implementation can be replaced underneath its users.

    It also keeps a book of the peers (key and allowed IPs) that this process put on the
    device, so the peer reconciler can compare the store with it after each change without
    reading every peer back from the device (about 80 us a peer across the server and
    wireguard-go: 0.8 s at 10,000). The book is None (unknown) after a swap and after a write
    that failed half-way, until the reconciler's next full read renews it (`rebook`).
    """

    def __init__(self, device: Device) -> None:
        self._current = device
        self._lock = threading.Lock()
        self._book: dict[str, tuple[IPNetwork, ...]] | None = {}

    @property
    def current(self) -> Device:
        return self._current

    @current.setter
    def current(self, device: Device) -> None:
        with self._lock:
            self._current = device
            self._book = None

    @property
    def name(self) -> str:
        return self.current.name

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            with self._lock:
                self._book = None
            raise

    def _note(self, peers: Sequence[PeerConfig]) -> None:
        with self._lock:
            if self._book is not None:
                for p in peers:
                    key = p.public_key.base64()
                    if not p.update_only or key in self._book:
                        self._book[key] = tuple(p.allowed_ips)

    def configure(
        self,
        private_key: PrivateKey,
        listen_port: int | None,
        peers: Sequence[PeerConfig],
        *,
        replace_peers: bool = True,
    ) -> None:
        with self._writing():
            self.current.configure(private_key, listen_port, peers, replace_peers=replace_peers)
        if replace_peers:
            with self._lock:
                self._book = {}
        self._note(peers)

    def set_peer(self, peer: PeerConfig) -> None:
        with self._writing():
            self.current.set_peer(peer)
        self._note([peer])

    def set_peers(self, peers: Sequence[PeerConfig]) -> None:
        with self._writing():
            self.current.set_peers(peers)
        self._note(peers)

    def remove_peer(self, public_key: PublicKey) -> None:
        with self._writing():
            self.current.remove_peer(public_key)
        with self._lock:
            if self._book is not None:
                self._book.pop(public_key.base64(), None)

    def peers(self) -> list[PeerStats]:
        return self.current.peers()

    def last_handshakes(self) -> list[float | None]:
        return self.current.last_handshakes()

    def rebook(self, stats: Sequence[PeerStats]) -> None:
        """Renew the book from a full read. Only the peer reconciler does this, under the lock
        Provision batches hold: a read by anyone else (the endpoint sync, `gatekeeper
        machines`) may race a write, and would put a stale view in the book."""
        with self._lock:
            self._book = {s.public_key.base64(): tuple(s.allowed_ips) for s in stats}

    def booked(self) -> dict[str, tuple[IPNetwork, ...]] | None:
        """The peers this process put on the device (base64 key -> allowed IPs), or None when
        that is not known and a full read is needed."""
        with self._lock:
            return None if self._book is None else dict(self._book)

    def listen_port(self) -> int:
        return self.current.listen_port()

    def set_addresses(self, addresses: Sequence[IPInterface]) -> None:
        self.current.set_addresses(addresses)

    def failure(self) -> str | None:
        return self.current.failure()

    def close(self) -> None:
        self.current.close()


def link_index(ifname: str) -> int | None:
    try:
        info = iplink.link_info(ifname)
    except WireGuardError:
        return None
    return None if info is None else info.index


class DeviceWatch:
    """Recreates the device when it vanishes; `create` builds and configures a new one."""

    def __init__(
        self,
        device: SwappableDevice,
        create: Callable[[], Device],
        restore: Callable[[], int],
        *,
        every: float = WATCH_EVERY,
    ) -> None:
        self.device = device
        self.create = create
        self.restore = restore
        self.every = every
        self.index = link_index(device.name)
        self.recreated = 0
        # Creating a device starts wireguard-go and waits for its socket (up to seconds): not
        # on the loop that carries every gRPC call. One thread that lives as long as the
        # process, because a wireguard-go started with a parent-death signal gets it when the
        # thread that started it ends (PR_SET_PDEATHSIG is per thread).
        self._creator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-create")

    def vanished(self) -> str | None:
        """Why the device is gone, or None while it is there."""
        try:
            info = iplink.link_info(self.device.name)
        except WireGuardError:
            return None  # cannot tell: never rebuild what may be fine
        index = None if info is None else info.index
        if index is None:
            return f"interface {self.device.name} is gone"
        if self.index is not None and index != self.index:
            return f"interface {self.device.name} was replaced by another link"
        # (wireguard-go's TUN is not persistent: when the process dies, the link goes too. A
        # device query would read every peer: too much work for a 2-second check.)
        return None

    async def repair(self, why: str) -> None:
        """The new device is made off the loop, and the swap happens on it (Provision's calls
        see the old or the new device, never none); putting the peers back is the peer
        reconciler's job, in a worker thread: it reads the store, and it reaches the tunnel
        hub through the loop."""
        log.error("WireGuard %s: recreating it and putting every peer back", why)
        old = self.device.current
        loop = asyncio.get_running_loop()

        def replace() -> tuple[Device, int | None]:
            with contextlib.suppress(Exception):
                old.close()  # a no-op on a link that is gone; never deletes a successor
            new = self.create()
            return new, link_index(new.name)

        self.device.current, self.index = await loop.run_in_executor(self._creator, replace)
        restored = await asyncio.to_thread(self.restore)
        self.recreated += 1
        log.warning(
            "WireGuard interface %s recreated, %d peers restored", self.device.name, restored
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                why = await asyncio.to_thread(self.vanished)
                if why is not None:
                    await self.repair(why)
            except Exception as exc:  # keep watching; the next round tries again
                log.error("cannot recreate WireGuard interface %s: %s", self.device.name, exc)
