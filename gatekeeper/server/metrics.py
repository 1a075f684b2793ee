"""Prometheus metrics of the server, served as text on `--metrics-listen`.

Counters are bumped where things happen; gauges that describe the fleet (machines registered,
machines connected) are computed when Prometheus scrapes, so the server does no per-peer work
on a timer of its own. Each server owns its CollectorRegistry (not the library's global one):
two servers in one test process do not mix their numbers.

The tunnel (WireGuard over gRPC) reports through `tunnel_streams` and `tunnel_bytes`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import start_wsgi_server

from gatekeeper.netaddr import split_host_port

OUTCOMES = (
    "ok",
    "denied",
    "invalid",
    "exhausted",
    "rate_limited",
    "busy",
    "error",
)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.provisions = Counter(
            "gatekeeper_provisions",
            "Provision calls answered, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.provisions.labels(outcome)
        self.machines_registered = Gauge(
            "gatekeeper_machines_registered",
            "Machines in the registry",
            registry=self.registry,
        )
        self.machines_connected = Gauge(
            "gatekeeper_machines_connected",
            "Machines whose WireGuard peer had a handshake within the link-down threshold",
            registry=self.registry,
        )
        self.tunnel_streams = Gauge(
            "gatekeeper_tunnel_streams",
            "Open WireGuard-over-gRPC streams",
            registry=self.registry,
        )
        self.tunnel_bytes = Counter(
            "gatekeeper_tunnel_relayed_bytes",
            "Bytes relayed between tunnel streams and the WireGuard device",
            ["direction"],
            registry=self.registry,
        )
        for direction in ("to_device", "to_machine"):
            self.tunnel_bytes.labels(direction)
        self.events = Counter(
            "gatekeeper_events_received",
            "Machine events stored",
            registry=self.registry,
        )
        self.log_lines = Counter(
            "gatekeeper_log_lines_received",
            "Machine log lines stored",
            registry=self.registry,
        )
        self.telemetry_refused = Counter(
            "gatekeeper_telemetry_refused",
            "Event or log senders refused (not a registered machine on the overlay)",
            ["kind"],
            registry=self.registry,
        )

        self.telemetry_dropped = Counter(
            "gatekeeper_telemetry_dropped",
            "Events and log lines dropped: the telemetry store was behind or away and its "
            "queue full (docs/registry.md)",
            registry=self.registry,
        )

        self.registry_up = Gauge(
            "gatekeeper_registry_up",
            "1 while this instance's last heartbeat was written to the registry, else 0",
            registry=self.registry,
        )
        self.heartbeat_age = Gauge(
            "gatekeeper_instance_heartbeat_age_seconds",
            "Seconds since this instance last wrote its heartbeat: past 15, while another "
            "instance still writes its own, that one may take this one's machines over "
            '(docs/registry.md, "Owners and failover")',
            registry=self.registry,
        )

    def watch_fleet(
        self, *, registered: Callable[[], float], connected: Callable[[], float]
    ) -> None:
        self.machines_registered.set_function(registered)
        self.machines_connected.set_function(connected)

    def watch_instance(self, *, up: Callable[[], float], age: Callable[[], float]) -> None:
        self.registry_up.set_function(up)
        self.heartbeat_age.set_function(age)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_listen(text: str) -> tuple[str, int]:
    """`[::1]:9100`, `127.0.0.1:9100`, `:9100` -> (host, port); one clear error otherwise."""
    host, port = split_host_port(  # the one rule: gatekeeper.netaddr
        text, "metrics listen address", allow_port_zero=True, allow_empty_host=True
    )
    return host or "::", port


@dataclass
class MetricsServer:
    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.httpd.shutdown()
            self.httpd.server_close()
        self.thread.join(2)


def serve_metrics(metrics: ServerMetrics, listen: str) -> MetricsServer:
    host, port = parse_listen(listen)
    try:
        httpd, thread = start_wsgi_server(port, host, registry=metrics.registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    return MetricsServer(httpd, thread)
