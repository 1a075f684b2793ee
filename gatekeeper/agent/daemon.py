"""`gatekeeper agent`: small reconcilers around the sans-I/O link lifecycle.

- the config source (`config_source`) turns the files into the desired configuration;
- the lifecycle (`gatekeeper.link.lifecycle.Link`) turns configuration and observations into
  the desired link; this module performs its actions and feeds back their outcomes as events;
- the device reconciler (`device`) owns the WireGuard backend and the tunnel relay, and
  supervises the device;
- the firewall, the maintenance listener and telemetry each converge to what the state says.

The reconcilers run under one `Runner`, which restarts a failed one with one backoff policy
and reports it in the status; no file or device I/O runs on the event loop, which also serves
the maintenance API and carries tunnelled packets. See docs/agent.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatekeeper.agent.config_source import ConfigSource, DesiredConfig, SourcePaths
from gatekeeper.agent.device import DeviceReconciler
from gatekeeper.agent.machine import wait_for_network
from gatekeeper.agent.maintenance_controller import LinkView, MaintenanceController
from gatekeeper.agent.probe import send_probe
from gatekeeper.agent.provision_client import ProvisionError, provision
from gatekeeper.agent.runner import Backoff, Runner
from gatekeeper.agent.status_file import DEFAULT_RUN_DIR, status_document, write_status
from gatekeeper.agent.telemetry import Telemetry
from gatekeeper.agent.unique_token import DEFAULT_STATE_DIR, TOKEN_NAME, UniqueTokenStore
from gatekeeper.config.talos_version import DEFAULT_TALOS_VERSION
from gatekeeper.firewall.controller import FirewallController
from gatekeeper.firewall.policy import DefaultAction, FirewallPolicy, LinkState
from gatekeeper.link.lifecycle import (
    SAMPLE_TIMER,
    Action,
    Cancel,
    ConfigChanged,
    ConfigRejected,
    ConfigureLink,
    Event,
    Link,
    LinkConfigured,
    LinkFailed,
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
    TunnelPreference,
    WaitForNetwork,
)
from gatekeeper.link.reply import BadReply
from gatekeeper.nslock import LockHeld, NamespaceLock
from gatekeeper.wireguard.keys import PrivateKey, PublicKey

log = logging.getLogger(__name__)

DEFAULT_LISTEN_PORT = 51821
# The kernel table is compared with the desired one this often (someone may flush it).
FIREWALL_CHECK_EVERY = 10.0
# Documents that were never read successfully do not mean "accept": until a valid set is
# read, the machine fails closed (the overlay and the WireGuard port stay admitted).
FAIL_CLOSED = FirewallPolicy(default_action=DefaultAction.BLOCK)


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
    # for them too); None: no document policy, only the always-present overlay guard.
    firewall_paths: list[Path] | None = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    unique_token_file: Path = DEFAULT_STATE_DIR / TOKEN_NAME
    talos_version: str = DEFAULT_TALOS_VERSION


class Agent:
    def __init__(self, options: AgentOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.clock = clock
        # Ephemeral: generated at start, kept across re-provisions, never written anywhere.
        self.key = PrivateKey.generate()
        timing = options.timing
        self.link = Link(
            listen_port=options.listen_port,
            timing=timing,
            tunnel_preference=options.tunnel_preference,
        )
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        backoff = Backoff(timing.backoff_initial, timing.backoff_factor, timing.backoff_max)
        self.runner = Runner(backoff, on_change=self.publish)
        self.device = DeviceReconciler(
            self.key, options.backend, post=self.events.put_nowait, on_status=self.publish
        )
        self.maintenance = MaintenanceController(options.maintenance_port)
        self.source = ConfigSource(
            SourcePaths(
                cmdline=options.cmdline,
                config=options.config,
                firewall=options.firewall_paths,
                node_uuid=options.node_uuid,
            ),
            self._on_config,
            poll=options.config_poll,
        )
        # Firewall: the last valid document policy (None until one was read).
        self.firewall = FirewallController(FAIL_CLOSED)
        self.firewall_documents = options.firewall_paths is not None
        self.firewall_paths: list[str] = []
        if options.firewall_paths is not None:
            paths = [*([options.config] if options.config else []), *options.firewall_paths]
            self.firewall_paths = [str(p.absolute()) for p in paths]
        else:
            self.firewall.set_policy(FirewallPolicy())
        self.firewall_policy_read = not self.firewall_documents
        # Why the documents were not taken, and why the kernel refused the table.
        self.firewall_document_error: str | None = None
        self.firewall_apply_error: str | None = None
        # The overlay addresses the kernel's table guards, as the last reconcile saw it.
        self._guarded: tuple[ipaddress.IPv6Address, ...] = ()
        self._firewall_wake = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._probe_seq = 0
        self._config_error: str | None = None
        # talos.events.sink= / talos.logging.kernel=: status events and kernel log lines.
        self.telemetry = Telemetry(backoff=backoff)
        self._status_dirty = asyncio.Event()
        self._status_doc: dict[str, Any] | None = None
        self.unique_tokens = UniqueTokenStore(options.unique_token_file)

    # -- running --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info("agent starting, WireGuard key %s (in memory only)", self.public_key.fingerprint())
        self.publish()
        self.runner.start("status", self._write_status_loop)
        self.runner.start("config", self.source.run)
        self.runner.start("device", self.device.supervise)
        self.runner.start("firewall", self._firewall_loop)
        self.runner.start("telemetry", self.telemetry.run)
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
                    self.step(event)
                except Exception:
                    # The lifecycle is pure and tested; a bug here must still not end the
                    # daemon that keeps the machine reachable. Reported, not hidden.
                    log.exception("internal error handling %s; carrying on", type(event).__name__)
                try:
                    await self.maintenance.reconcile(self.view())
                except Exception:
                    log.exception("maintenance API reconcile failed; retried at the next step")
        finally:
            stopper.cancel()
            await self.close()

    def step(self, event: Event) -> None:
        for action in self.link.handle(event, self.clock()):
            self.perform(action)
        self._firewall_wake.set()
        self.publish()

    def view(self) -> LinkView:
        identity = self.link.identity
        return LinkView(
            config=self.link.config,
            status=self.link.status,
            spec=self.device.spec,
            link_index=self.device.link_index,
            public_key=self.public_key.base64(),
            listen_port=self.options.listen_port,
            node_uuid=identity.node_uuid if identity else None,
            config_error=self._config_error,
        )

    @property
    def public_key(self) -> PublicKey:
        return self.key.public_key()

    def publish(self, **extra: Any) -> None:
        """Build the status document now; a writer task puts it on disk off the loop."""
        backend = self.device.backend
        doc = status_document(
            self.link.status,
            backend=backend.name if backend else None,
            backend_reason=self.device.backend_reason or None,
            public_key=self.public_key.base64(),
            listen_port=self.options.listen_port,
            maintenance_port=self.options.maintenance_port,
            config_error=self._config_error,
            firewall="error" if self.firewall_error else "ok",
            firewall_error=self.firewall_error,
            # In force in the kernel (as last applied or checked) for the current address.
            firewall_overlay_guard=bool(self._guarded)
            and self._guarded == self._link_state().overlay_addresses,
            firewall_policy=self.firewall.policy.default_action.value,
            # So that `gatekeeper firewall show` compares with what the agent enforces.
            firewall_paths=self.firewall_paths if self.firewall_documents else None,
            tunnel_stream=self.device.tunnel_status(),
            reconcilers=self.runner.report(),
            updated=time.time(),
            **extra,
        )
        self._status_doc = doc
        self._status_dirty.set()
        self.telemetry.status(doc)

    async def _write_status_loop(self) -> None:
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            await self._write_status()
            # Coalesce bursts (a tunnel relay reports often): at most ~20 writes a second.
            await asyncio.sleep(0.05)

    async def _write_status(self) -> None:
        doc = self._status_doc
        if doc is None:
            return
        try:
            await asyncio.to_thread(write_status, self.options.run_dir, doc)
        except OSError as exc:
            log.warning("cannot write status to %s: %s", self.options.run_dir, exc)

    async def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        await self.runner.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.device.close()
        await self.maintenance.close()
        self.publish(state="stopped", connected=False)
        await self._write_status()

    # -- the desired configuration --------------------------------------------------------

    @property
    def firewall_error(self) -> str | None:
        problems = [p for p in (self.firewall_document_error, self.firewall_apply_error) if p]
        return "; ".join(problems) or None

    async def _on_config(self, desired: DesiredConfig) -> None:
        if desired.cmdline_text is not None:
            self.telemetry.set_cmdline(desired.cmdline_text)
        if desired.error is not None:
            self._config_error = desired.error
            await self.events.put(ConfigRejected(desired.error))
        else:
            self._config_error = None
            identity = desired.identity
            assert identity is not None
            if desired.siderolink is not None and identity.unique_token is None:
                # The document's uniqueToken wins; else the one generated once and kept
                # (a file: read or created off the loop, then cached).
                token = await asyncio.to_thread(self.unique_tokens.token)
                identity = dataclasses.replace(identity, unique_token=token)
            await self.events.put(ConfigChanged(desired.siderolink, identity))
        if self.firewall_documents:
            if desired.firewall is not None:
                self.firewall.set_policy(desired.firewall)
                self.firewall_policy_read = True
            problem = None if desired.firewall_error is None else self._kept(desired.firewall_error)
            if problem != self.firewall_document_error:
                if problem:
                    log.error("firewall: %s", problem)
                self.firewall_document_error = problem
                self.publish()
        self._firewall_wake.set()

    def _kept(self, error: str) -> str:
        if self.firewall_policy_read:
            return f"{error} (the ruleset in force is kept)"
        return f"{error} (no valid documents yet: failing closed, ingress block)"

    # -- firewall -------------------------------------------------------------------------

    def _link_state(self) -> LinkState:
        port = self.options.listen_port
        spec = self.device.spec
        return LinkState(
            wireguard_ports=(port,) if port else (),
            overlay_addresses=(spec.address.ip,) if spec is not None else (),
        )

    async def _firewall_loop(self) -> None:
        """Keep the ingress table equal to the policy and the link; off the loop."""
        last_verify = -FIREWALL_CHECK_EVERY
        while True:
            self._firewall_wake.clear()
            link = self._link_state()
            verify = time.monotonic() - last_verify >= FIREWALL_CHECK_EVERY
            if verify:
                last_verify = time.monotonic()
            # Woken by a change: cheap unless the policy or the link changed. On the timer:
            # read the kernel back (someone may have flushed the table).
            result = await asyncio.to_thread(self.firewall.reconcile, link, verify=verify)
            guarded = link.overlay_addresses if result.in_force else ()
            if guarded != self._guarded:
                self._guarded = guarded
                self.publish()
            if result.error != self.firewall_apply_error:
                if result.error:
                    log.error("firewall: %s (the ruleset in force is kept)", result.error)
                self.firewall_apply_error = result.error
                self.publish()
            if result.changed:
                guard = link.overlay_addresses
                applied = result.policy or self.firewall.policy
                log.info(
                    "firewall in force (ingress %s%s)",
                    applied.default_action.value,
                    f"; {guard[0]} only via the overlay links" if guard else "",
                )
                self.publish()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._firewall_wake.wait(), FIREWALL_CHECK_EVERY)

    # -- actions --------------------------------------------------------------------------

    def perform(self, action: Action) -> None:
        match action:
            case Log(level, message):
                log.log(logging.getLevelName(level.upper()), message)
            case WaitForNetwork(config):
                self._spawn(self._wait_network(config.api.host))
            case Provision() as p:
                self._spawn(self._provision(p))
            case ConfigureLink(attempt, spec):
                self._spawn(self._configure(attempt, spec))
            case RemoveLink():
                self._spawn(self.device.remove())
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

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
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
            self._spawn(self._sample())
        else:
            self.events.put_nowait(TimerFired(name))

    async def _sample(self) -> None:
        try:
            sample = await self.device.sample()
        except Exception:
            log.exception("reading the link's counters failed unexpectedly")
            sample = None
        # No device (or no answer) is silence: the lifecycle keeps sampling and, if it
        # lasts, declares the link down. Never a lost timer.
        await self.events.put(sample if sample is not None else Sample(None, 0))

    async def _wait_network(self, host: str) -> None:
        try:
            ready = await wait_for_network(host, self.options.network_timeout)
        except Exception as exc:
            log.warning("cannot check the route to %s (%s); trying anyway", host, exc)
            ready = True
        if not ready:
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

    async def _configure(self, attempt: int, spec: Any) -> None:
        try:
            await self.device.apply(spec, self.link.config.api if self.link.config else None)
        except Exception as exc:
            # Whatever failed, the lifecycle hears of it and backs off: a link is never left
            # in CONFIGURING without a timer.
            if not isinstance(exc, OSError | ValueError | RuntimeError):
                log.exception("configuring the link failed unexpectedly")
            await self.events.put(LinkFailed(attempt, str(exc) or type(exc).__name__))
        else:
            await self.events.put(LinkConfigured(attempt))


class AgentStartError(RuntimeError):
    """The agent cannot start here; the message is one line saying why."""


def namespace_lock() -> NamespaceLock | None:
    """One agent per network namespace: its link name, firewall table and maintenance port
    are the namespace's. None when /run/gatekeeper is not writable (runs unguarded)."""
    lock = NamespaceLock("agent")
    try:
        lock.acquire()
    except LockHeld as exc:
        who = f" (pid {exc.holder})" if exc.holder else ""
        raise AgentStartError(
            f"another gatekeeper agent{who} runs in this network namespace: one agent per "
            "namespace (the link, the firewall table and the maintenance port are shared)"
        ) from None
    except OSError as exc:
        log.warning("cannot take %s (%s): not guarding against a second agent", lock.path, exc)
        return None
    return lock


async def run_agent(options: AgentOptions) -> None:
    lock = namespace_lock()
    try:
        await _run(options)
    finally:
        if lock is not None:
            lock.release()


async def _run(options: AgentOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Agent(options).run(stop)
