"""`gatekeeper server`: wires the registry, the WireGuard device and the gRPC services together."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from gatekeeper.overlay import overlay_prefix, server_address, split_endpoint
from gatekeeper.server.devicewatch import (
    DeviceWatch,
    InterfaceInUse,
    InterfaceLock,
    SwappableDevice,
)
from gatekeeper.server.endpoint_sync import EndpointSyncSchedule
from gatekeeper.server.fleet import Fleet, FleetError, FleetOptions, provision_server_options
from gatekeeper.server.instances import InstanceHeartbeat, default_instance
from gatekeeper.server.joininfo import JoinInfo, api_url, write_join_info
from gatekeeper.server.logreceiver import MAX_CONNECTIONS as LOG_MAX_CONNECTIONS
from gatekeeper.server.peer_reconciler import PeerReconciler
from gatekeeper.server.provisioning import Provisioner
from gatekeeper.server.registry import Registry, RegistryError, ServerIdentity
from gatekeeper.server.registry_url import open_registry
from gatekeeper.server.service import ProvisionService, add_provision_service
from gatekeeper.server.tokens import TokenPolicy
from gatekeeper.tunnel.header import tunnel_secret
from gatekeeper.tunnel.peers import TunnelMode
from gatekeeper.tunnel.server import TUNNEL_BATCH_BYTES, TunnelHub, add_to_server
from gatekeeper.tunnel.server import server_options as tunnel_server_options
from gatekeeper.wireguard.backend import Device, WireGuardError
from gatekeeper.wireguard.keys import PrivateKey
from gatekeeper.wireguard.select import select_backend
from gatekeeper.wireguard.userspace import UserspaceBackend

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
    # When the device is read for the endpoints machines were seen at (endpoint_sync.py).
    endpoint_sync: EndpointSyncSchedule = field(default_factory=EndpointSyncSchedule)
    fleet: FleetOptions = field(default_factory=FleetOptions)
    # WireGuard over gRPC: off, allow (machines that ask), always (every machine).
    tunnel_mode: TunnelMode = TunnelMode.ALLOW
    # False (--disable-last-endpoint): restored peers get no endpoint (omni#2730).
    restore_last_endpoint: bool = True
    # `--registry URL` (None: SQLite in state_dir) and where its password is (docs/registry.md).
    registry: str | None = None
    registry_password_file: Path | None = None
    # `--instance`: this server's name in a fleet of several (docs/registry.md, "Owners").
    instance: str = field(default_factory=default_instance)


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
        self.service: ProvisionService | None = None
        self.tunnels: TunnelHub | None = None
        self.port = 0
        self._sync_task: asyncio.Task[None] | None = None
        self.reconciler: PeerReconciler | None = None
        self.heartbeat: InstanceHeartbeat | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.watch: DeviceWatch | None = None
        self._lock: IO[bytes] | None = None
        self._interface_lock: InterfaceLock | None = None
        self.fleet = Fleet(
            options.state_dir,
            options.fleet,
            registry_url=options.registry,
            registry_password_file=options.registry_password_file,
        )

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
            self.registry = open_registry(
                opts.registry, opts.state_dir, password_file=opts.registry_password_file
            )
            # Also with a registry elsewhere: the audit log, journals and admin socket.
            opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ServerError(f"cannot create {opts.state_dir}: {exc.strerror or exc}") from None
        except RegistryError as exc:
            raise ServerError(str(exc)) from None
        # Before touching any device: a second server on the same state would otherwise take
        # over (delete) the first one's WireGuard link and cut every machine off.
        self._lock = acquire_state_lock(opts.state_dir)
        try:
            identity = self.registry.identity(
                lambda: ServerIdentity(PrivateKey.generate(), opts.installation_id)
            )
        except RegistryError as exc:
            raise ServerError(str(exc)) from None
        if identity.installation_id != opts.installation_id:
            raise ServerError(
                f"the registry {opts.registry or opts.state_dir} belongs to installation id "
                f"{identity.installation_id!r}, not {opts.installation_id!r}: every machine's "
                "address depends on it; use the original id or another --state-dir or --registry"
            )
        prefix = overlay_prefix(identity.installation_id)
        # Before touching the interface: another live server's link is never taken over.
        self._interface_lock = InterfaceLock(opts.wireguard_interface)
        try:
            self._interface_lock.acquire()
        except InterfaceInUse as exc:
            self._interface_lock = None
            raise ServerError(str(exc)) from None
        except OSError as exc:
            # (A server without write access to /run: it runs, unguarded, as before.)
            log.warning(
                "cannot lock interface %s (%s): a second server could take it over",
                opts.wireguard_interface,
                exc.strerror or exc,
            )
            self._interface_lock = None
        try:
            backend, why = select_backend(opts.backend)
            if isinstance(backend, UserspaceBackend):
                backend.die_with_parent = True  # why: UserspaceBackend.die_with_parent
            log.info("WireGuard backend: %s (%s)", backend.name, why)

            def create() -> Device:
                device = backend.create(opts.wireguard_interface)
                try:
                    device.configure(
                        identity.private_key, opts.wireguard_port, [], replace_peers=True
                    )
                    device.set_addresses(
                        [ipaddress.IPv6Interface(f"{server_address(prefix)}/{prefix.prefixlen}")]
                    )
                except BaseException:
                    device.close()
                    raise
                return device

            self.device = SwappableDevice(create())
        except WireGuardError as exc:
            raise ServerError(str(exc)) from None
        self.options.fleet.log_max_connections = log_connection_budget(open_file_limit())
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
            instance=opts.instance,
        )
        provisioner = self.provisioner
        self.heartbeat = InstanceHeartbeat(
            self.registry,
            name=opts.instance,
            endpoints=opts.endpoints,
            on_fleet=lambda endpoints: setattr(provisioner, "fleet_endpoints", endpoints),
        )
        heartbeat = self.heartbeat
        self.fleet.metrics.watch_instance(up=lambda: float(heartbeat.reachable), age=heartbeat.age)
        try:
            # Before the device holds anything: a second process under this name is refused.
            await asyncio.to_thread(self.heartbeat.first)
        except RegistryError as exc:
            raise ServerError(str(exc)) from None
        # The device is the reconciled result of the registry: restoring at start, after the
        # device's re-creation, and following removals or other instances' provisions through
        # the shared store are all this one reconcile (docs/registry.md).
        self.reconciler = PeerReconciler(
            self.registry,
            self.device,
            instance=opts.instance,
            endpoints_of=self.provisioner.reconcile_endpoints,
            forget_addresses=self.provisioner.forget_tunnels,
            lock=self.provisioner.device_lock,
            booked=self.device.booked,
            rebook=self.device.rebook,
        )
        try:
            restored = self.reconciler.reconcile().added
        except RegistryError as exc:
            raise ServerError(str(exc)) from None
        if self.provisioner.tokens.open():
            log.warning("no join token configured: any machine that reaches this server may join")
        try:
            await self.fleet.start(
                registry=self.registry,
                device=self.device,
                prefix=prefix,
                forget_address=self.provisioner.forget_tunnel,
                store_reachable=lambda: heartbeat.reachable,
            )
        except FleetError as exc:
            raise ServerError(str(exc)) from None

        options = provision_server_options()
        if self.tunnels is not None:
            # Tunnel messages carry batches of datagrams (gatekeeper.tunnel.batching).
            options = tunnel_server_options(options)
        self.grpc = grpc.aio.server(options=options)
        self.provisioner.loop = asyncio.get_running_loop()
        self.service = ProvisionService(self.fleet.guard(self.provisioner), self.fleet.metrics)
        add_provision_service(self.grpc, self.service)
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
        # For `gatekeeper join-config`: what machines dial, recorded once it is true.
        write_join_info(
            opts.state_dir,
            JoinInfo(
                api_url=api_url(opts.listen, opts.endpoints, self.port, tls=bool(opts.tls_cert)),
                tls=bool(opts.tls_cert),
                server_address=str(server_address(prefix)),
                events_port=opts.fleet.events_port,
                logs_port=opts.fleet.logs_port,
                tunnel_mode=opts.tunnel_mode.value,
                fixed_token=bool(opts.join_token),
            ),
        )
        self._sync_task = asyncio.create_task(self._sync_endpoints())
        reconciler = self.reconciler
        self.watch = DeviceWatch(self.device, create, lambda: reconciler.reconcile().added)
        reconciler.start()
        self.heartbeat.start()
        self._watch_task = asyncio.create_task(self.watch.run())
        log.info(
            "server ready: instance %s, gRPC %s (%s), WireGuard %s port %d, overlay %s, "
            "server key %s, %d machines restored, tunnel %s",
            opts.instance,
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
        schedule = self.options.endpoint_sync
        timer = schedule.start(time.monotonic())
        while True:
            await asyncio.sleep(schedule.tick)
            if not timer.due(time.monotonic(), self.fleet.last_provision()):
                continue
            timer.ran(time.monotonic())
            try:
                # Reading every peer takes a while with thousands: not on the event loop.
                await asyncio.to_thread(self.provisioner.sync_endpoints)
            except Exception as exc:  # the loop must outlive one bad read
                log.warning("endpoint sync failed: %s", exc)

    async def close(self) -> None:
        if self.reconciler is not None:
            await asyncio.to_thread(self.reconciler.stop)
        for task in (self._watch_task, self._sync_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.grpc:
            await self.grpc.stop(grace=1)
        if self.service:
            # A Provision still in its thread may wait for the loop (tunnel hub): not here.
            await asyncio.to_thread(self.service.close)
        await self.fleet.close()
        if self.tunnels:
            self.tunnels.close()
        if self.provisioner:
            with contextlib.suppress(Exception):
                self.provisioner.sync_endpoints()
        if self.device:
            self.device.close()
        if self.heartbeat is not None:
            # Only now that the device is gone: survivors take the machines over at their
            # next heartbeat, and must not while this device still holds them.
            await asyncio.to_thread(self.heartbeat.stop)
        if self.registry:
            self.registry.close()
        if self._interface_lock is not None:
            self._interface_lock.release()
            self._interface_lock = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the limit the server then has.

    Every tunnel peer holds a relay socket, every log connection and gRPC connection one
    descriptor: distributions' soft default (1024) is far too low for a fleet.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
    if soft < 4096:
        log.warning(
            "open file limit is %d: tunnel peers and log connections share it; raise it "
            "(systemd: LimitNOFILE=) for a large fleet",
            soft,
        )
    return int(soft)


def log_connection_budget(limit: int) -> int:
    """Log connections in all: a quarter of the descriptors left after a fixed reserve."""
    return max(16, min(LOG_MAX_CONNECTIONS, (limit - 128) // 4))


GIL_SWITCH_INTERVAL_S = 0.001
_ACCEPT_FAILED = "socket.accept() out of system resource"


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every: float = 10.0) -> None:
    """asyncio logs a full traceback for every accept() that hits EMFILE: one line instead,
    at most every `every` seconds (the listener retries by itself a second later)."""
    last = [float("-inf")]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == _ACCEPT_FAILED and isinstance(exc, OSError):
            now = time.monotonic()
            if now - last[0] >= every:
                last[0] = now
                log.warning(
                    "accepting a connection failed: %s (%s)",
                    exc.strerror or exc,
                    errno.errorcode.get(exc.errno or 0, "?"),
                )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


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
    # Provision batches run in worker threads, and a thread that wants the GIL back waits up
    # to one switch interval for it: the loop that relays tunnelled packets did so at every
    # wake-up during a storm. With 1 ms instead of 5 the storm's added tunnel RTT had a median
    # of 21 ms instead of 26 over 13 runs each (ranges overlapping), provisions/s no lower
    # (docs/registry.md, "Provision storms"). Process-wide, and this is the server's process.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server = Server(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        log.info("stopping")
    finally:
        await server.close()
