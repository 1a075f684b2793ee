"""`gatekeeper server`: wires the registry, the WireGuard device and the gRPC services together."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from gatekeeper.overlay import overlay_prefix, server_address, split_endpoint
from gatekeeper.server.fleet import Fleet, FleetError, FleetOptions, provision_server_options
from gatekeeper.server.provisioning import Provisioner
from gatekeeper.server.registry import Registry, RegistryError, ServerIdentity
from gatekeeper.server.service import ProvisionService, add_provision_service
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.server.tokens import TokenPolicy
from gatekeeper.tunnel.header import tunnel_secret
from gatekeeper.tunnel.peers import TunnelMode
from gatekeeper.tunnel.server import TUNNEL_BATCH_BYTES, TunnelHub, add_to_server
from gatekeeper.tunnel.server import server_options as tunnel_server_options
from gatekeeper.wireguard.backend import Device, WireGuardError
from gatekeeper.wireguard.keys import PrivateKey
from gatekeeper.wireguard.select import select_backend

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server cannot start; the message says why in one line."""


@dataclass
class ServerOptions:
    state_dir: Path
    listen: str = "[::]:8090"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    join_token: str | None = field(default=None, repr=False)
    installation_id: str = ""
    wireguard_interface: str = "siderolink"
    wireguard_port: int = 51820
    endpoints: list[str] = field(default_factory=list)
    backend: str = "auto"
    endpoint_sync_every: float = 5.0
    # With no machine joining, endpoints only change when machines roam: reading every peer
    # (about 80 us each across the server and wireguard-go) is then done this rarely.
    endpoint_sync_idle_every: float = 300.0
    fleet: FleetOptions = field(default_factory=FleetOptions)
    # WireGuard over gRPC: off, allow (machines that ask), always (every machine).
    tunnel_mode: TunnelMode = TunnelMode.ALLOW
    # False (--disable-last-endpoint): restored peers get no endpoint (omni#2730).
    restore_last_endpoint: bool = True


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    try:
        return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    except OSError as exc:
        raise ServerError(f"cannot read TLS certificate or key: {exc}") from None


class Server:
    """A started server; `close()` removes its device and stops its listeners."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.registry: Registry | None = None
        self.device: Device | None = None
        self.grpc: grpc.aio.Server | None = None
        self.provisioner: Provisioner | None = None
        self.tunnels: TunnelHub | None = None
        self.port = 0
        self._sync_task: asyncio.Task[None] | None = None
        self._lock: IO[bytes] | None = None
        self.fleet = Fleet(options.state_dir, options.fleet)

    async def start(self) -> None:
        opts = self.options
        if not opts.endpoints:
            raise ServerError(
                "no WireGuard endpoint to advertise: pass --endpoint HOST:PORT "
                "(the address machines reach this server's UDP port on)"
            )
        for endpoint in opts.endpoints:
            try:
                split_endpoint(endpoint)
            except ValueError as exc:
                raise ServerError(f"--endpoint: {exc}") from None
        if (opts.tls_cert is None) != (opts.tls_key is None):
            raise ServerError("--tls-cert and --tls-key go together")
        try:
            self.registry = SqliteRegistry(opts.state_dir)
        except RegistryError as exc:
            raise ServerError(str(exc)) from None
        # Before touching any device: a second server on the same state would otherwise take
        # over (delete) the first one's WireGuard link and cut every machine off.
        self._lock = acquire_state_lock(opts.state_dir)
        identity = self.registry.identity(
            lambda: ServerIdentity(PrivateKey.generate(), opts.installation_id)
        )
        if identity.installation_id != opts.installation_id:
            raise ServerError(
                f"the state in {opts.state_dir} belongs to installation id "
                f"{identity.installation_id!r}, not {opts.installation_id!r}: every machine's "
                "address depends on it; use the original id or another --state-dir"
            )
        prefix = overlay_prefix(identity.installation_id)
        try:
            backend, why = select_backend(opts.backend)
            log.info("WireGuard backend: %s (%s)", backend.name, why)
            self.device = backend.create(opts.wireguard_interface)
            self.device.configure(identity.private_key, opts.wireguard_port, [], replace_peers=True)
            self.device.set_addresses(
                [ipaddress.IPv6Interface(f"{server_address(prefix)}/{prefix.prefixlen}")]
            )
        except WireGuardError as exc:
            raise ServerError(str(exc)) from None
        if opts.tunnel_mode is not TunnelMode.OFF:
            # Tunnel peers' datagrams reach the device through relay sockets on loopback.
            self.tunnels = TunnelHub(self.device.listen_port(), batch_bytes=TUNNEL_BATCH_BYTES)
        self.provisioner = Provisioner(
            registry=self.registry,
            device=self.device,
            prefix=prefix,
            server_public_key=identity.private_key.public_key(),
            endpoints=opts.endpoints,
            tokens=TokenPolicy(
                opts.join_token, self.registry.token, self.registry.tokens, time.time
            ),
            max_machines=opts.fleet.max_machines,
            tunnel_mode=opts.tunnel_mode,
            tunnels=self.tunnels,
            tunnel_secret=tunnel_secret(identity.private_key.base64()),
            restore_last_endpoint=opts.restore_last_endpoint,
        )
        restored = self.provisioner.restore_peers()
        if self.provisioner.tokens.open():
            log.warning("no join token configured: any machine that reaches this server may join")
        try:
            await self.fleet.start(
                registry=self.registry,
                device=self.device,
                prefix=prefix,
                forget_address=self.provisioner.forget_tunnel,
            )
        except FleetError as exc:
            raise ServerError(str(exc)) from None

        options = provision_server_options()
        if self.tunnels is not None:
            # Tunnel messages carry batches of datagrams (gatekeeper.tunnel.batching).
            options = tunnel_server_options(options)
        self.grpc = grpc.aio.server(options=options)
        add_provision_service(self.grpc, ProvisionService(self.fleet.guard(self.provisioner)))
        if self.tunnels is not None:
            add_to_server(self.tunnels, self.grpc)  # same port, same TLS as Provision
        if opts.tls_cert and opts.tls_key:
            creds = server_credentials(opts.tls_cert, opts.tls_key)
            self.port = self.grpc.add_secure_port(opts.listen, creds)
        else:
            self.port = self.grpc.add_insecure_port(opts.listen)
        if not self.port:
            raise ServerError(f"cannot listen on {opts.listen}")
        await self.grpc.start()
        self._sync_task = asyncio.create_task(self._sync_endpoints())
        log.info(
            "server ready: gRPC %s (%s), WireGuard %s port %d, overlay %s, server key %s, "
            "%d machines restored, tunnel %s",
            opts.listen,
            "TLS" if opts.tls_cert else "plaintext",
            opts.wireguard_interface,
            self.device.listen_port(),
            prefix,
            identity.private_key.public_key().fingerprint(),
            restored,
            opts.tunnel_mode.value,
        )

    async def _sync_endpoints(self) -> None:
        assert self.provisioner is not None
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.options.endpoint_sync_every)
            idle_for = time.monotonic() - last
            if not self.fleet.joining() and idle_for < self.options.endpoint_sync_idle_every:
                continue
            last = time.monotonic()
            try:
                # Reading every peer takes a while with thousands: not on the event loop.
                await asyncio.to_thread(self.provisioner.sync_endpoints)
            except Exception as exc:  # the loop must outlive one bad read
                log.warning("endpoint sync failed: %s", exc)

    async def close(self) -> None:
        if self._sync_task:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        if self.grpc:
            await self.grpc.stop(grace=1)
        await self.fleet.close()
        if self.tunnels:
            self.tunnels.close()
        if self.provisioner:
            with contextlib.suppress(Exception):
                self.provisioner.sync_endpoints()
        if self.device:
            self.device.close()
        if self.registry:
            self.registry.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def acquire_state_lock(state_dir: Path) -> IO[bytes]:
    """An exclusive lock on the state directory, held for the life of the process."""
    handle = open(state_dir / "server.lock", "ab")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ServerError(
            f"another gatekeeper server is running with --state-dir {state_dir}"
        ) from None
    return handle


async def serve(options: ServerOptions) -> None:
    server = Server(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        log.info("stopping")
    finally:
        await server.close()
