"""`gatekeeper agent`: drives the link lifecycle with real I/O.

The lifecycle (`gatekeeper.link.lifecycle.Link`) decides; this module only performs its
actions (Provision over gRPC, the WireGuard device, probes, timers) and feeds back what
happened. Every outcome, including failures, becomes an event, so the daemon never dies of a
bad configuration or an unreachable server: it reports and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatekeeper.agent.machine import MachineError, node_uuid, wait_for_network
from gatekeeper.agent.maintenance_controller import LinkView, MaintenanceController
from gatekeeper.agent.probe import send_probe
from gatekeeper.agent.provision_client import ProvisionError, provision
from gatekeeper.agent.status_file import DEFAULT_RUN_DIR, status_document, write_status
from gatekeeper.agent.telemetry import Telemetry
from gatekeeper.agent.unique_token import DEFAULT_STATE_DIR, TOKEN_NAME, UniqueTokenStore
from gatekeeper.config.errors import ConfigError
from gatekeeper.config.resolve import resolve_config
from gatekeeper.config.talos_version import DEFAULT_TALOS_VERSION
from gatekeeper.firewall.controller import FirewallController
from gatekeeper.firewall.policy import FirewallPolicy, LinkState
from gatekeeper.link.lifecycle import (
    SAMPLE_TIMER,
    Action,
    Cancel,
    ConfigChanged,
    ConfigRejected,
    ConfigureLink,
    Event,
    Identity,
    Link,
    LinkConfigured,
    LinkFailed,
    LinkSpec,
    Log,
    NetworkReady,
    Provision,
    ProvisionFailed,
    ProvisionSucceeded,
    RemoveLink,
    Sample,
    Schedule,
    SendProbe,
    TimerFired,
    Timing,
    TunnelFailed,
    TunnelPreference,
    WaitForNetwork,
)
from gatekeeper.link.reply import BadReply
from gatekeeper.overlay import split_endpoint
from gatekeeper.tunnel.client import TunnelClient, TunnelError
from gatekeeper.tunnel.header import HeaderError, canonical_peer
from gatekeeper.wireguard import iplink
from gatekeeper.wireguard.backend import Backend, Device, PeerConfig, WireGuardError
from gatekeeper.wireguard.keys import PrivateKey, PublicKey
from gatekeeper.wireguard.select import select_backend

log = logging.getLogger(__name__)

DEFAULT_LISTEN_PORT = 51821


@dataclass
class AgentOptions:
    cmdline: Path = Path("/proc/cmdline")
    config: Path | None = None
    node_uuid: str | None = None
    listen_port: int = DEFAULT_LISTEN_PORT
    run_dir: Path = DEFAULT_RUN_DIR
    backend: str = "auto"
    network_timeout: float = 60.0
    config_poll: float = 2.0
    maintenance_port: int = 50000
    tunnel_preference: TunnelPreference = TunnelPreference.AUTO
    # Documents with NetworkDefaultActionConfig / NetworkRuleConfig (the --config file is read
    # for them too); None turns the agent's firewall off.
    firewall_paths: list[Path] | None = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    unique_token_file: Path = DEFAULT_STATE_DIR / TOKEN_NAME
    talos_version: str = DEFAULT_TALOS_VERSION


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


class Agent:
    def __init__(self, options: AgentOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.clock = clock
        # Ephemeral: generated at start, kept across re-provisions, never written anywhere.
        self.key = PrivateKey.generate()
        self.link = Link(
            listen_port=options.listen_port,
            timing=options.timing,
            tunnel_preference=options.tunnel_preference,
        )
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.device: Device | None = None
        self.backend: Backend | None = None
        self.backend_reason = ""
        self.spec: LinkSpec | None = None
        self.link_index = 0
        # The relay between `siderolinktun` and CreateStream, while in tunnel mode.
        self.tunnel: TunnelClient | None = None
        self.maintenance = MaintenanceController(options.maintenance_port)
        self.firewall: FirewallController | None = None
        self.firewall_paths: list[str] = []
        if options.firewall_paths is not None:
            paths = [*([options.config] if options.config else []), *options.firewall_paths]
            self.firewall_paths = [str(p.absolute()) for p in paths]
            self.firewall = FirewallController(FirewallPolicy(), paths=paths)
        self.firewall_error: str | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._probe_seq = 0
        self._last_config_error: str | None = None
        # talos.events.sink= / talos.logging.kernel=: status events and kernel log lines.
        self.telemetry = Telemetry(options.cmdline)
        self.unique_tokens = UniqueTokenStore(options.unique_token_file)

    # -- running --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info("agent starting, WireGuard key %s (in memory only)", self.public_key.fingerprint())
        self.publish()
        self._spawn(self._watch_config())
        self._spawn(self.telemetry.run())
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.create_task(self.events.get())
                done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                event = getter.result()
                try:
                    await self.step(event)
                except Exception:
                    # A bug in one step must not end the daemon that keeps the machine reachable.
                    log.exception("internal error handling %s; carrying on", type(event).__name__)
        finally:
            stopper.cancel()
            await self.close()

    async def step(self, event: Event) -> None:
        for action in self.link.handle(event, self.clock()):
            await self.perform(action)
        self.publish()
        await self.maintenance.reconcile(self.view())

    def view(self) -> LinkView:
        identity = self.link.identity
        return LinkView(
            config=self.link.config,
            status=self.link.status,
            spec=self.spec,
            link_index=self.link_index,
            public_key=self.public_key.base64(),
            listen_port=self.options.listen_port,
            node_uuid=identity.node_uuid if identity else None,
            config_error=self._last_config_error,
        )

    @property
    def public_key(self) -> PublicKey:
        return self.key.public_key()

    def publish(self, **extra: Any) -> None:
        doc = status_document(
            self.link.status,
            backend=self.backend.name if self.backend else None,
            backend_reason=self.backend_reason or None,
            public_key=self.public_key.base64(),
            listen_port=self.options.listen_port,
            firewall=("off" if self.firewall is None else "error" if self.firewall_error else "ok"),
            firewall_error=self.firewall_error,
            # So that `gatekeeper firewall show` compares with what the agent enforces.
            firewall_paths=self.firewall_paths if self.firewall else None,
            tunnel_stream=self._tunnel_status(),
            updated=time.time(),
            **extra,
        )
        try:
            write_status(self.options.run_dir, doc)
        except OSError as exc:
            log.warning("cannot write status to %s: %s", self.options.run_dir, exc)
        self.telemetry.status(doc)

    async def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stop_tunnel()
        await asyncio.to_thread(self._remove_device)
        await self.maintenance.close()
        self.publish(state="stopped", connected=False)

    # -- actions --------------------------------------------------------------------------

    async def perform(self, action: Action) -> None:
        match action:
            case Log(level, message):
                log.log(logging.getLevelName(level.upper()), message)
            case WaitForNetwork(config):
                self._spawn(self._wait_network(config.api.host))
            case Provision() as p:
                self._spawn(self._provision(p))
            case ConfigureLink(attempt, spec):
                await self._configure(attempt, spec)
            case RemoveLink():
                await self._stop_tunnel()
                # Stopping wireguard-go may take seconds: not on the loop serving the API.
                await asyncio.to_thread(self._remove_device)
            case Schedule(name, delay):
                self._schedule(name, delay)
            case Cancel(name):
                handle = self._timers.pop(name, None)
                if handle:
                    handle.cancel()
            case SendProbe(target):
                self._probe_seq += 1
                try:
                    send_probe(target, self._probe_seq)
                except OSError as exc:
                    log.debug("probe to %s not sent: %s", target, exc)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_coro(), exc_info=task.exception())

    def _schedule(self, name: str, delay: float) -> None:
        old = self._timers.pop(name, None)
        if old:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[name] = loop.call_later(delay, self._fire, name)

    def _fire(self, name: str) -> None:
        self._timers.pop(name, None)
        if name == SAMPLE_TIMER:
            self.events.put_nowait(self._sample())
        else:
            self.events.put_nowait(TimerFired(name))

    def _sample(self) -> Event:
        if self.device is None or self.spec is None:
            return TimerFired(SAMPLE_TIMER)
        try:
            stats = [
                s
                for s in self.device.peers()
                if s.public_key.base64() == self.spec.server_public_key
            ]
        except WireGuardError as exc:
            log.warning("reading the link's counters failed: %s", exc)
            stats = []
        if not stats:
            return Sample(last_handshake=None, rx_bytes=0)
        s = stats[0]
        return Sample(last_handshake=s.last_handshake, rx_bytes=s.rx_bytes, endpoint=s.endpoint)

    def _reconcile_firewall(self) -> None:
        """Keep the ingress table equal to the documents; a bad document keeps the old one."""
        if self.firewall is None:
            return
        problem = self.firewall.reload()
        port = self.options.listen_port
        result = self.firewall.reconcile(LinkState(wireguard_ports=(port,) if port else ()))
        problem = problem or result.error
        if problem != self.firewall_error:
            if problem:
                log.error("firewall: %s (the ruleset in force is kept)", problem)
            else:
                log.info("firewall in force (%s)", self.firewall.policy.default_action.value)
            self.firewall_error = problem
            self.publish()
        elif result.changed:
            log.info("firewall re-applied (the kernel table differed from the documents)")

    async def _watch_config(self) -> None:
        """Re-read the configuration sources; the lifecycle ignores what did not change."""
        while True:
            try:
                await asyncio.to_thread(self._reconcile_firewall)
            except Exception:  # the poll must go on: it is how a fixed config gets picked up
                log.exception("firewall reconcile failed unexpectedly")
            try:
                config = resolve_config(self.options.cmdline, self.options.config)
                identity = Identity(
                    node_uuid=node_uuid(self.options.node_uuid),
                    # The document's uniqueToken wins over the generated one.
                    unique_token=(config.unique_token or self.unique_tokens.token())
                    if config
                    else None,
                )
            except (ConfigError, MachineError) as exc:
                if str(exc) != self._last_config_error:
                    self._last_config_error = str(exc)
                    await self.events.put(ConfigRejected(str(exc)))
            else:
                self._last_config_error = None
                await self.events.put(ConfigChanged(config, identity))
            await asyncio.sleep(self.options.config_poll)

    async def _wait_network(self, host: str) -> None:
        if not await wait_for_network(host, self.options.network_timeout):
            log.warning(
                "no route to %s after %.0f s; trying anyway", host, self.options.network_timeout
            )
        await self.events.put(NetworkReady())

    async def _provision(self, p: Provision) -> None:
        log.info("provisioning with %s", p.config.api.redacted_url())
        try:
            reply = await provision(
                p.config.api,
                p.identity,
                self.public_key,
                tunnel=p.tunnel,
                talos_version=self.options.talos_version,
            )
        except (ProvisionError, BadReply) as exc:
            await self.events.put(ProvisionFailed(p.attempt, str(exc)))
        except Exception as exc:  # never let one odd failure end the retry loop
            log.exception("provisioning failed unexpectedly")
            await self.events.put(ProvisionFailed(p.attempt, f"unexpected error: {exc}"))
        else:
            await self.events.put(ProvisionSucceeded(p.attempt, reply))

    async def _configure(self, attempt: int, spec: LinkSpec) -> None:
        try:
            relay = await self._ensure_tunnel(spec)
            await asyncio.to_thread(self._apply_spec, spec, relay)
        except (WireGuardError, OSError, TunnelError, HeaderError, ValueError) as exc:
            await self.events.put(LinkFailed(attempt, str(exc)))
        else:
            await self.events.put(LinkConfigured(attempt))

    async def _ensure_tunnel(self, spec: LinkSpec) -> str | None:
        """In tunnel mode, a running relay for this spec; its endpoint for the device's peer.

        The relay dials the same host, port and TLS choice as the API. One that still runs
        for the same API and header is kept, so re-configuring the link (next endpoint, same
        reply again) does not drop the stream.
        """
        config = self.link.config
        if not spec.grpc_peer_addr_port or config is None:
            await self._stop_tunnel()
            return None
        header = canonical_peer(spec.grpc_peer_addr_port)
        current = self.tunnel
        if current and current.running and current.api == config.api and current.header == header:
            return current.local_endpoint
        await self._stop_tunnel()
        self.tunnel = TunnelClient(
            config.api,
            header,
            on_fatal=lambda error: self.events.put_nowait(TunnelFailed(error)),
            on_status=lambda _status: self.publish(),
            device_port=spec.listen_port,
        )
        return await self.tunnel.start()

    async def _stop_tunnel(self) -> None:
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            await tunnel.close()

    def _tunnel_status(self) -> dict[str, Any] | None:
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

    def _apply_spec(self, spec: LinkSpec, relay: str | None = None) -> None:
        if self.device is not None and self.device.name != spec.name:
            self._remove_device()
        if self.device is None:
            if self.backend is None:
                self.backend, self.backend_reason = select_backend(self.options.backend)
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

    def _remove_device(self) -> None:
        if self.device is not None:
            try:
                self.device.close()
            except WireGuardError as exc:
                log.warning("removing %s failed: %s", self.device.name, exc)
            self.device = None
            self.spec = None


async def run_agent(options: AgentOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Agent(options).run(stop)
