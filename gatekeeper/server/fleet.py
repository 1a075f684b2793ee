"""What a server needs to hold a fleet, started and stopped as one piece by `app.Server`.

- the audit log and per-source failure limit around Provision (`guard.py`);
- machine isolation in the server's namespace (`isolation.py`);
- the admin socket for the CLI (`admin.py`);
- events (gRPC) and machine logs (TCP) on the server's overlay address only, stored through
  the telemetry store (`telemetry.py`: journals in the state directory, or the PostgreSQL
  registry's tables);
- Prometheus metrics on `metrics_listen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gatekeeper.firewall.apply import FirewallApplyError, FirewallUnavailable
from gatekeeper.overlay import server_address
from gatekeeper.server.admin import AdminServer
from gatekeeper.server.attribution import Attributor
from gatekeeper.server.audit import AUDIT_NAME, AuditLog
from gatekeeper.server.events import EventSinkService, add_event_sink, events_server_options
from gatekeeper.server.guard import ProvisionGuard
from gatekeeper.server.isolation import install_isolation, remove_isolation
from gatekeeper.server.journal import EVENT_MAX_BYTES, LOG_MAX_BYTES
from gatekeeper.server.logreceiver import MAX_CONNECTIONS as LOG_MAX_CONNECTIONS
from gatekeeper.server.logreceiver import LogReceiver
from gatekeeper.server.metrics import MetricsServer, ServerMetrics, serve_metrics
from gatekeeper.server.provisioning import Provisioner
from gatekeeper.server.registry import Registry, RegistryError
from gatekeeper.server.registry_url import parse_registry_url, read_password_file
from gatekeeper.server.telemetry import (
    JournalTelemetry,
    Retention,
    TelemetryBackend,
    TelemetryQueue,
)
from gatekeeper.wireguard.backend import Device, WireGuardError

log = logging.getLogger(__name__)

# A machine counts as connected while its last handshake is younger than the machine's own
# link-down threshold (docs/compatibility.md: 180 + 5 + 90 s).
CONNECTED_WITHIN = 275.0
EVENTS_PORT = 8090
LOGS_PORT = 8092
# Provision requests are a few hundred bytes; anything far larger is refused by gRPC before
# it is parsed.
PROVISION_MAX_MESSAGE = 16 << 10


def provision_server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", PROVISION_MAX_MESSAGE),
        ("grpc.max_send_message_length", PROVISION_MAX_MESSAGE),
    ]


class FleetError(RuntimeError):
    """A fleet feature cannot start; the message says why in one line."""


@dataclass
class FleetOptions:
    max_machines: int | None = None
    metrics_listen: str | None = None
    # 0 turns the listener off.
    events_port: int = EVENTS_PORT
    logs_port: int = LOGS_PORT
    isolation: bool = True
    # Log connections in all (the server sizes it to its open-file limit); None: the default.
    log_max_connections: int | None = None
    # Retention: bytes on disk per machine's logs and for all events (two files of half
    # each, see journal.py), and a maximum age (None: size only).
    logs_max_bytes: int = 2 * LOG_MAX_BYTES
    logs_max_age: float | None = None
    events_max_bytes: int = 2 * EVENT_MAX_BYTES
    events_max_age: float | None = None


def logs_dir(state_dir: Path) -> Path:
    return state_dir / "logs"


def events_dir(state_dir: Path) -> Path:
    return state_dir / "events"


def connected_count(device: Device, now: float) -> int:
    return sum(1 for t in device.last_handshakes() if t is not None and now - t < CONNECTED_WITHIN)


def registered_gauge(
    registry: Registry, store_reachable: Callable[[], bool]
) -> Callable[[], float]:
    """The registered-machines gauge: NaN (unknown) while the store is away, since a scrape
    that raised would lose every series, and one that waited on a hanging store past
    Prometheus's scrape timeout too; `store_reachable` (the heartbeat's last answer) says
    so without asking the store."""

    def registered() -> float:
        if not store_reachable():
            return math.nan
        try:
            return float(registry.machine_count())
        except Exception:  # RegistryError, or a store this version cannot read
            return math.nan

    return registered


def connected_gauge(device: Device, clock: Callable[[], float] = time.time) -> Callable[[], float]:
    """The connected-machines gauge: NaN while the device is away for a moment (DeviceWatch
    recreates it)."""

    def connected() -> float:
        try:
            return float(connected_count(device, clock()))
        except WireGuardError:
            return math.nan

    return connected


class Fleet:
    def __init__(
        self,
        state_dir: Path,
        options: FleetOptions,
        *,
        registry_url: str | None = None,
        registry_password_file: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.options = options
        self.registry_url = registry_url
        self.registry_password_file = registry_password_file
        self.metrics = ServerMetrics()
        self.audit = AuditLog(state_dir / AUDIT_NAME)
        self.admin: AdminServer | None = None
        self.events_server: grpc.aio.Server | None = None
        self.log_receiver: LogReceiver | None = None
        self.metrics_server: MetricsServer | None = None
        self.provision_guard: ProvisionGuard | None = None
        self.telemetry: TelemetryQueue | None = None
        self._isolated = False
        self.events_port = 0
        self.logs_port = 0

    def guard(self, provisioner: Provisioner) -> ProvisionGuard:
        self.provision_guard = ProvisionGuard(provisioner, audit=self.audit, metrics=self.metrics)
        return self.provision_guard

    def last_provision(self) -> float | None:
        """time.monotonic() of the last Provision answered OK (the start counts as one: the
        machines restored then handshake soon after), None before the service exists."""
        guard = self.provision_guard
        return None if guard is None else guard.last_ok

    async def start(
        self,
        *,
        registry: Registry,
        device: Device,
        prefix: ipaddress.IPv6Network,
        forget_address: Callable[[ipaddress.IPv6Address], None] | None = None,
        store_reachable: Callable[[], bool] = lambda: True,
    ) -> None:
        """`store_reachable`: whether the registry answered last (the instance's heartbeat);
        while it did not, a scrape does not wait on the store for the registered count."""
        opts = self.options
        if opts.max_machines is not None and opts.max_machines < 1:
            raise FleetError(f"--max-machines must be at least 1, not {opts.max_machines}")
        if opts.isolation:
            try:
                install_isolation(prefix, device.name)
            except (FirewallUnavailable, FirewallApplyError) as exc:
                raise FleetError(
                    f"cannot isolate machines from each other: {exc} "
                    "(--no-isolation skips this, leaving only WireGuard's allowed IPs)"
                ) from None
            self._isolated = True
        self.admin = AdminServer(self.state_dir, device, forget_address)
        try:
            await self.admin.start()
        except OSError as exc:
            raise FleetError(str(exc)) from None

        self.metrics.watch_fleet(
            registered=registered_gauge(registry, store_reachable),
            connected=connected_gauge(device),
        )
        if opts.metrics_listen:
            try:
                self.metrics_server = serve_metrics(self.metrics, opts.metrics_listen)
            except (OSError, ValueError) as exc:
                raise FleetError(str(exc)) from None
        address = str(server_address(prefix))
        attributor = Attributor(registry, prefix)
        if opts.events_port or opts.logs_port:
            self.telemetry = TelemetryQueue(
                self._telemetry_backend(),
                retention=self._retention(),
                on_drop=self.metrics.telemetry_dropped.inc,
            )
        if opts.events_port:
            assert self.telemetry is not None
            sink = self.telemetry.sink("events")
            self.events_server = grpc.aio.server(options=events_server_options())
            add_event_sink(self.events_server, EventSinkService(attributor, sink, self.metrics))
            try:
                self.events_port = self.events_server.add_insecure_port(
                    f"[{address}]:{opts.events_port}"
                )
            except RuntimeError:
                self.events_port = 0
            if not self.events_port:
                raise FleetError(f"cannot listen for events on [{address}]:{opts.events_port}")
            await self.events_server.start()
        if opts.logs_port:
            assert self.telemetry is not None
            self.log_receiver = LogReceiver(
                attributor,
                self.telemetry.sink("logs"),
                self.metrics,
                max_connections=opts.log_max_connections or LOG_MAX_CONNECTIONS,
            )
            try:
                self.logs_port = await self.log_receiver.start(address, opts.logs_port)
            except OSError as exc:
                raise FleetError(
                    f"cannot listen for machine logs on [{address}]:{opts.logs_port}: "
                    f"{exc.strerror or exc}"
                ) from None
        log.info(
            "fleet: isolation %s, events %s, logs %s, metrics %s",
            "on" if self._isolated else "off",
            f"[{address}]:{self.events_port}" if self.events_port else "off",
            f"[{address}]:{self.logs_port}" if self.logs_port else "off",
            opts.metrics_listen or "off",
        )

    def _retention(self) -> Retention:
        opts = self.options
        return Retention(
            logs_max_bytes=opts.logs_max_bytes,
            events_max_bytes=opts.events_max_bytes,
            logs_max_age=opts.logs_max_age,
            events_max_age=opts.events_max_age,
        )

    def _telemetry_backend(self) -> TelemetryBackend:
        """Where the registry is PostgreSQL, its tables (readable by every instance);
        otherwise the journals in the state directory."""
        try:
            target = parse_registry_url(self.registry_url, self.state_dir)
        except RegistryError as exc:
            raise FleetError(str(exc)) from None
        if target.kind != "postgresql":
            return JournalTelemetry(
                events_dir(self.state_dir), logs_dir(self.state_dir), self._retention()
            )
        from gatekeeper.server.pg_telemetry import PostgresTelemetry

        password = None
        if self.registry_password_file is not None:
            try:
                password = read_password_file(self.registry_password_file)
            except RegistryError as exc:
                raise FleetError(str(exc)) from None
        return PostgresTelemetry(
            target.where, shown=target.where, retention=self._retention(), password=password
        )

    async def close(self) -> None:
        if self.events_server is not None:
            await self.events_server.stop(grace=0.5)
        if self.log_receiver is not None:
            await self.log_receiver.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.admin is not None:
            await self.admin.close()
        if self.telemetry is not None:
            # What is queued is written first (bounded): a clean stop loses nothing.
            await asyncio.to_thread(self.telemetry.close, 2.0)
            self.telemetry = None
        if self._isolated:
            with contextlib.suppress(FirewallUnavailable, FirewallApplyError):
                remove_isolation()
            self._isolated = False
