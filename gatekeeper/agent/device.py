"""The device reconciler: owns the WireGuard backend, the device and the tunnel relay.

The desired state is the lifecycle's `LinkSpec` (plus the key, fixed for the process); the
observed state is the device. Every device call (UAPI, netlink, starting or stopping
wireguard-go) runs in a worker thread, never on the event loop that serves the maintenance API
and carries tunnelled packets. `supervise()` asks the device every second whether it still
works; a wireguard-go that died or a link that was deleted is reported as `DeviceLost`, and
the lifecycle answers with a new `ConfigureLink` for the same spec, which builds the device
again with the same key, port, peer and address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gatekeeper.link.lifecycle import DeviceLost, Event, LinkSpec, Sample, TunnelFailed
from gatekeeper.overlay import split_endpoint
from gatekeeper.tunnel.header import canonical_peer
from gatekeeper.wireguard import iplink
from gatekeeper.wireguard.backend import Backend, Device, PeerConfig, WireGuardError
from gatekeeper.wireguard.keys import PrivateKey, PublicKey
from gatekeeper.wireguard.select import select_backend

if TYPE_CHECKING:
    from gatekeeper.tunnel.client import TunnelClient

log = logging.getLogger(__name__)

SUPERVISE_EVERY = 1.0


def resolve_endpoint(endpoint: str) -> str:
    """host:port with the host resolved now (DNS may move between reconnects)."""
    try:
        host, port = split_endpoint(endpoint)
    except ValueError as exc:
        raise WireGuardError(str(exc)) from None
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise WireGuardError(f"endpoint host {host!r} does not resolve")
    addr = ipaddress.ip_address(infos[0][4][0])
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class DeviceReconciler:
    def __init__(
        self,
        key: PrivateKey,
        backend_choice: str,
        post: Callable[[Event], None],
        on_status: Callable[[], None],
    ) -> None:
        self.key = key
        self.backend_choice = backend_choice
        self.post = post
        self.on_status = on_status
        self.backend: Backend | None = None
        self.backend_reason = ""
        self.device: Device | None = None
        self.spec: LinkSpec | None = None
        self.link_index = 0
        self.tunnel: TunnelClient | None = None
        # The device failure already reported for the current device (reported once).
        self._reported: str | None = None
        self._lock = asyncio.Lock()
        # Held by the worker thread itself: cancelling the awaiting task does not stop a
        # thread, so removal must wait for a build in flight, or it would leak its device.
        self._thread_lock = threading.Lock()

    # -- converge ---------------------------------------------------------------------------

    async def apply(self, spec: LinkSpec, api: Any) -> None:
        """Make the device equal `spec` (raises what failed; the caller reports LinkFailed)."""
        async with self._lock:
            relay = await self._ensure_tunnel(spec, api)
            await asyncio.to_thread(self._apply, spec, relay)
            self._reported = None

    async def remove(self) -> None:
        async with self._lock:
            await self._stop_tunnel()
            await asyncio.to_thread(self._remove)

    async def sample(self) -> Event | None:
        """The server peer's counters as a `Sample`; None when there is no device."""
        device, spec = self.device, self.spec
        if device is None or spec is None:
            return None
        try:
            peers = await asyncio.to_thread(device.peers)
        except WireGuardError as exc:
            log.debug("reading the link's counters failed: %s", exc)
            return Sample(last_handshake=None, rx_bytes=0)
        for s in peers:
            if s.public_key.base64() == spec.server_public_key:
                return Sample(
                    last_handshake=s.last_handshake, rx_bytes=s.rx_bytes, endpoint=s.endpoint
                )
        return Sample(last_handshake=None, rx_bytes=0)

    async def supervise(self) -> None:
        """Notice within a second that the device stopped working; report it once."""
        while True:
            await asyncio.sleep(SUPERVISE_EVERY)
            device = self.device
            if device is None or self._lock.locked():
                continue
            failure = await asyncio.to_thread(self._check, device)
            if failure and failure != self._reported and device is self.device:
                self._reported = failure
                log.warning("WireGuard device lost: %s", failure)
                self.post(DeviceLost(failure))

    def _check(self, device: Device) -> str | None:
        """Why the device does not match its spec: dead, stuck, or changed under us."""
        failure = device.failure()
        spec = self.spec
        if failure is not None or spec is None:
            return failure
        info = iplink.link_info(spec.name)
        if info is None:
            return f"the link {spec.name} was deleted"
        if not info.up:
            return f"the link {spec.name} was set down"
        if spec.address not in info.addresses:
            return f"the link {spec.name} lost its address {spec.address}"
        return None

    # -- the tunnel relay -------------------------------------------------------------------

    async def _ensure_tunnel(self, spec: LinkSpec, api: Any) -> str | None:
        """In tunnel mode, a running relay for this spec; its endpoint for the device's peer.

        The relay dials the same host, port and TLS choice as the API. One that still runs
        for the same API and header is kept, so re-configuring the link (next endpoint, same
        reply again, a rebuilt device) does not drop the stream.
        """
        if not spec.grpc_peer_addr_port or api is None:
            await self._stop_tunnel()
            return None
        header = canonical_peer(spec.grpc_peer_addr_port)
        current = self.tunnel
        if current and current.running and current.api == api and current.header == header:
            return current.local_endpoint
        await self._stop_tunnel()
        # Imported by the first machine that is told to tunnel: a direct link never needs the
        # relay (about 0.2 s of the VM guest's start-up under emulation).
        from gatekeeper.tunnel.client import TunnelClient

        self.tunnel = TunnelClient(
            api,
            header,
            on_fatal=lambda error: self.post(TunnelFailed(error)),
            on_status=lambda _status: self.on_status(),
            device_port=spec.listen_port,
        )
        return await self.tunnel.start()

    async def _stop_tunnel(self) -> None:
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            await tunnel.close()

    def tunnel_status(self) -> dict[str, Any] | None:
        if self.tunnel is None:
            return None
        s = self.tunnel.status
        return {
            "state": s.state,
            "detail": s.detail,
            "batching": s.batching,
            "sent": s.sent,
            "received": s.received,
            "dropped": s.dropped,
            "streams": s.streams,
        }

    # -- in a worker thread -----------------------------------------------------------------

    def _apply(self, spec: LinkSpec, relay: str | None) -> None:
        with self._thread_lock:
            self._apply_locked(spec, relay)

    def _apply_locked(self, spec: LinkSpec, relay: str | None) -> None:
        if self.device is not None and (
            self.device.name != spec.name or self.device.failure() is not None
        ):
            self._remove_locked()
        if self.device is None:
            if self.backend is None:
                self.backend, self.backend_reason = select_backend(self.backend_choice)
                log.info("WireGuard backend: %s (%s)", self.backend.name, self.backend_reason)
            self.device = self.backend.create(spec.name, mtu=spec.mtu)
        peer = PeerConfig(
            public_key=PublicKey.from_base64(spec.server_public_key),
            allowed_ips=(ipaddress.IPv6Network(f"{spec.server_address}/128"),),
            # Tunnel mode: the server is reached through the local relay socket.
            endpoint=relay if relay else resolve_endpoint(spec.endpoint),
            persistent_keepalive=spec.keepalive,
        )
        self.device.configure(self.key, spec.listen_port, [peer], replace_peers=True)
        self.device.set_addresses([spec.address])
        info = iplink.link_info(spec.name)
        self.link_index = info.index if info else 0
        self.spec = spec

    def _remove(self) -> None:
        with self._thread_lock:
            self._remove_locked()

    def _remove_locked(self) -> None:
        if self.device is not None:
            try:
                self.device.close()
            except WireGuardError as exc:
                log.warning("removing %s failed: %s", self.device.name, exc)
            self.device = None
            self.spec = None
            self.link_index = 0

    async def close(self) -> None:
        await self.remove()
