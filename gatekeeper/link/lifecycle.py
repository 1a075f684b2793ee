"""The SideroLink link lifecycle as a sans-I/O state machine.

Events go in (`Link.handle(event, now)`), actions come out; nothing here touches a socket, a
device or a clock. The agent's driver performs the actions (gRPC Provision, WireGuard device,
probes, timers) and feeds their outcomes back as events, so every path through the lifecycle
(provision -> configure -> watch -> next endpoint -> re-provision) is tested without a network.

Liveness, and why it is measured this way: WireGuard only proves a path alive by traffic that
comes back. Talos waits for the last handshake to be 275 s old, which is slow because a healthy
idle link re-handshakes only every two minutes. We watch the receive counter instead: any
received byte proves the path. When nothing has arrived for `probe_after` seconds we send a
probe (an ICMPv6 echo to the server's overlay address) whose reply is traffic; a link is
declared down only when nothing has arrived for `dead_after` seconds despite probes. An idle
healthy link answers its probes, so it never flaps; a dead path is noticed within
`dead_after + sample_every`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from enum import StrEnum

from gatekeeper.config.siderolink import SideroLinkConfig

LINK_NAME = "siderolink"
TUNNEL_LINK_NAME = "siderolinktun"
LINK_MTU = 1280
PERSISTENT_KEEPALIVE = 25


@dataclass(frozen=True)
class Timing:
    """Every delay of the lifecycle, in seconds; tests shrink them."""

    backoff_initial: float = 0.5
    backoff_factor: float = 1.5
    backoff_max: float = 60.0
    sample_every: float = 5.0
    # Until the first handshake, look often: "link up" should be reported when it happens.
    connecting_sample_every: float = 0.1
    probe_after: float = 10.0
    dead_after: float = 45.0
    # Tunnel "auto": how long a fresh UDP link may stay without a handshake before the
    # tunnel is asked for, and how long the tunnel is used before UDP is tried again
    # (doubling while UDP keeps failing, up to the cap).
    udp_fallback_after: float = 15.0
    udp_retry_after: float = 600.0
    udp_retry_max: float = 7200.0

    @classmethod
    def for_link_timeout(cls, dead_after: float) -> Timing:
        """Scale probing and sampling with the time a silent link is given before it is down."""
        return cls(
            dead_after=dead_after,
            udp_fallback_after=min(15.0, dead_after / 3),
            probe_after=max(0.5, dead_after * 2 / 9),
            sample_every=max(0.25, min(5.0, dead_after / 9)),
        )


@dataclass(frozen=True)
class Identity:
    node_uuid: str
    unique_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Provisioned:
    """A Provision reply, already checked and with the endpoint list in preference order."""

    server_public_key: str
    node_address: ipaddress.IPv6Interface
    server_address: ipaddress.IPv6Address
    endpoints: tuple[str, ...]
    grpc_peer_addr_port: str = ""
    # Entries of server_endpoint that were not host:port (reported, not used).
    ignored_endpoints: tuple[str, ...] = ()

    @property
    def tunnel(self) -> bool:
        return bool(self.grpc_peer_addr_port)


@dataclass(frozen=True)
class LinkSpec:
    """What the WireGuard link must look like (docs/compatibility.md, step 4)."""

    name: str
    address: ipaddress.IPv6Interface
    mtu: int
    listen_port: int | None
    server_public_key: str
    server_address: ipaddress.IPv6Address
    endpoint: str
    keepalive: int
    grpc_peer_addr_port: str


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigChanged:
    config: SideroLinkConfig | None
    identity: Identity


@dataclass(frozen=True)
class ConfigRejected:
    """A new configuration failed to parse: keep what runs, report why."""

    error: str


@dataclass(frozen=True)
class NetworkReady:
    pass


@dataclass(frozen=True)
class ProvisionSucceeded:
    attempt: int
    reply: Provisioned


@dataclass(frozen=True)
class ProvisionFailed:
    attempt: int
    error: str


@dataclass(frozen=True)
class LinkConfigured:
    attempt: int


@dataclass(frozen=True)
class LinkFailed:
    attempt: int
    error: str


@dataclass(frozen=True)
class TunnelFailed:
    """The tunnel's stream was refused for good (`peer not allowed` or `peer replaced`)."""

    error: str


@dataclass(frozen=True)
class DeviceLost:
    """The WireGuard device stopped working (its wireguard-go exited, its link vanished)."""

    error: str


@dataclass(frozen=True)
class Sample:
    """Counters read from the device for the server peer."""

    last_handshake: float | None
    rx_bytes: int
    endpoint: str | None = None


@dataclass(frozen=True)
class TimerFired:
    name: str


Event = (
    ConfigChanged
    | ConfigRejected
    | NetworkReady
    | ProvisionSucceeded
    | ProvisionFailed
    | LinkConfigured
    | LinkFailed
    | TunnelFailed
    | DeviceLost
    | Sample
    | TimerFired
)

# --- actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitForNetwork:
    config: SideroLinkConfig


@dataclass(frozen=True)
class Provision:
    attempt: int
    config: SideroLinkConfig
    identity: Identity
    tunnel: bool


@dataclass(frozen=True)
class ConfigureLink:
    attempt: int
    spec: LinkSpec


@dataclass(frozen=True)
class RemoveLink:
    pass


@dataclass(frozen=True)
class Schedule:
    """Fire TimerFired(name) after delay; a new Schedule of the same name replaces the old."""

    name: str
    delay: float


@dataclass(frozen=True)
class Cancel:
    name: str


@dataclass(frozen=True)
class SendProbe:
    target: ipaddress.IPv6Address


@dataclass(frozen=True)
class Log:
    level: str
    message: str


Action = (
    WaitForNetwork | Provision | ConfigureLink | RemoveLink | Schedule | Cancel | SendProbe | Log
)

RETRY_TIMER = "retry"
SAMPLE_TIMER = "sample"
UDP_RETRY_TIMER = "udp-retry"


class TunnelPreference(StrEnum):
    """The machine's wish for WireGuard over gRPC; the server decides in the end."""

    OFF = "off"  # ask only when the API URL says grpc_tunnel=true (as Talos does)
    ON = "on"  # always ask
    AUTO = "auto"  # UDP first; ask when no handshake succeeds over UDP, retry UDP later


class State(StrEnum):
    UNCONFIGURED = "unconfigured"
    WAITING_NETWORK = "waiting-network"
    PROVISIONING = "provisioning"
    BACKOFF = "backoff"
    CONFIGURING = "configuring"
    CONNECTING = "connecting"
    UP = "up"


@dataclass(frozen=True)
class Status:
    """What the agent publishes; no secret ever goes in here."""

    state: State = State.UNCONFIGURED
    connected: bool = False
    api: str | None = None
    config_source: str | None = None
    link_name: str | None = None
    node_address: str | None = None
    server_address: str | None = None
    server_public_key: str | None = None
    endpoint: str | None = None
    endpoints: tuple[str, ...] = ()
    tunnel: bool = False
    last_handshake: float | None = None
    rx_bytes: int = 0
    last_error: str | None = None
    next_retry_in: float | None = None
    provisions: int = 0
    since: float = 0.0
    # Which path carries WireGuard ("udp" or "tunnel") and why, for tunnel "auto".
    path: str | None = None
    path_reason: str | None = None


class Link:
    """The lifecycle of one SideroLink link. Feed events, perform the returned actions."""

    def __init__(
        self,
        *,
        listen_port: int | None = None,
        timing: Timing | None = None,
        tunnel_preference: TunnelPreference = TunnelPreference.OFF,
    ) -> None:
        self.listen_port = listen_port
        self.timing = timing or Timing()
        self.tunnel_preference = TunnelPreference(tunnel_preference)
        # AUTO: the tunnel is asked for after UDP failed; the wait before trying UDP again.
        self._fallback = False
        self._fallback_reason: str | None = None
        # AUTO: the server answered a tunnel request with UDP; don't ask again until the retry.
        self._declined = False
        self._udp_retry_delay = self.timing.udp_retry_after
        self.status = Status()
        self._config: SideroLinkConfig | None = None
        self._identity: Identity | None = None
        self._attempt = 0
        self._failures = 0
        self._reply: Provisioned | None = None
        self._endpoint_index = 0
        self._link_present = False
        self._last_rx = -1
        self._last_progress = 0.0
        self._last_probe = 0.0

    # -- public -------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        match event:
            case ConfigChanged(config, identity):
                return self._on_config(config, identity, now)
            case ConfigRejected(error):
                self._set(now, last_error=error)
                kept = (
                    "keeping the current link" if self._link_present else "waiting for a valid one"
                )
                return [Log("error", f"configuration rejected ({kept}): {error}")]
            case NetworkReady():
                if self.status.state is State.WAITING_NETWORK:
                    return self._provision(now)
                return []
            case ProvisionSucceeded(attempt, reply) if self._current(attempt, State.PROVISIONING):
                return self._on_provisioned(reply, now)
            case ProvisionFailed(attempt, error) if self._current(attempt, State.PROVISIONING):
                return self._on_provision_failed(error, now)
            case LinkConfigured(attempt) if self._current(attempt, State.CONFIGURING):
                return self._on_link_configured(now)
            case LinkFailed(attempt, error) if self._current(attempt, State.CONFIGURING):
                return self._on_provision_failed(f"configuring the link failed: {error}", now)
            case TunnelFailed(error) if self.status.tunnel and self.status.state in (
                State.CONNECTING,
                State.UP,
            ):
                # The server forgot this tunnel peer, or another stream took it over: only a
                # new Provision can tell which tunnel (if any) this machine should use now.
                self._set(now, connected=False, last_error=error)
                return [
                    Log("warning", f"tunnel down: {error}; provisioning again"),
                    Cancel(SAMPLE_TIMER),
                    *self._provision(now),
                ]
            case DeviceLost(error) if self.status.state in (State.CONNECTING, State.UP):
                # Same reply, same key: only the device has to be built again.
                self._set(now, connected=False, last_error=error)
                return [
                    Log("warning", f"link down: {error}; restoring the device"),
                    Cancel(SAMPLE_TIMER),
                    *self._configure(now),
                ]
            case DeviceLost(error) if self._link_present:
                # Re-provisioning (or backing off) while the old link was kept: it is gone
                # now; the next reply builds a new device (the dead one is replaced).
                self._set(now, connected=False, last_error=error)
                return [Log("warning", f"link down: {error}")]
            case Sample() as sample if self.status.state in (State.CONNECTING, State.UP):
                return self._on_sample(sample, now)
            case TimerFired(name) if name == RETRY_TIMER and self.status.state is State.BACKOFF:
                return self._provision(now)
            case TimerFired(name) if (
                name == UDP_RETRY_TIMER
                and self._fallback
                and self.status.state in (State.CONNECTING, State.UP)
            ):
                return self._retry_udp(now)
        return []

    def _current(self, attempt: int, state: State) -> bool:
        """An outcome counts only for the work in flight; older ones are stale."""
        return attempt == self._attempt and self.status.state is state

    @property
    def config(self) -> SideroLinkConfig | None:
        return self._config

    @property
    def identity(self) -> Identity | None:
        return self._identity

    @property
    def spec(self) -> LinkSpec | None:
        if self._reply is None:
            return None
        return self._spec(self._reply)

    # -- transitions --------------------------------------------------------------------

    def _set(self, now: float, **changes: object) -> None:
        new = replace(self.status, **changes)  # type: ignore[arg-type]
        if new.state is not self.status.state:
            new = replace(new, since=now)
        self.status = new

    def _on_config(
        self, config: SideroLinkConfig | None, identity: Identity, now: float
    ) -> list[Action]:
        if config == self._config and identity == self._identity:
            return []
        self._config, self._identity = config, identity
        self._attempt += 1  # outcomes of work started for the old config are now stale
        self._failures = 0
        self._fallback, self._fallback_reason, self._declined = False, None, False
        self._udp_retry_delay = self.timing.udp_retry_after
        actions: list[Action] = [Cancel(RETRY_TIMER), Cancel(UDP_RETRY_TIMER)]
        if config is None:
            self._reply = None
            if self._link_present:
                self._link_present = False
                actions += [Cancel(SAMPLE_TIMER), RemoveLink()]
            self.status = Status(state=State.UNCONFIGURED, since=now)
            return [*actions, Log("info", "SideroLink is not configured")]
        self._set(
            now,
            api=config.api.redacted_url(),
            config_source=config.source,
            last_error=None,
            next_retry_in=None,
        )
        actions.append(Log("info", f"SideroLink API {config.api.redacted_url()} ({config.source})"))
        if self.status.state is State.UNCONFIGURED:
            self._set(now, state=State.WAITING_NETWORK)
            return [*actions, WaitForNetwork(config)]
        # A change of config, node UUID or unique token re-provisions at once, keeping the
        # current link (and so the management path) up until the new reply is in.
        return actions + self._provision(now)

    def _provision(self, now: float) -> list[Action]:
        assert self._config is not None and self._identity is not None
        self._attempt += 1
        self._set(now, state=State.PROVISIONING, next_retry_in=None)
        return [Provision(self._attempt, self._config, self._identity, tunnel=self._wants_tunnel())]

    def _wants_tunnel(self) -> bool:
        if self._config is not None and self._config.api.grpc_tunnel:
            return True
        if self.tunnel_preference is TunnelPreference.ON:
            return True
        return (
            self.tunnel_preference is TunnelPreference.AUTO
            and self._fallback
            and not self._declined
        )

    def _path_reason(self, reply: Provisioned, asked: bool) -> str:
        if reply.tunnel:
            if self._fallback and self._fallback_reason:
                return self._fallback_reason
            return "asked for by this machine" if asked else "the server's choice"
        if asked:
            return "the server declined the tunnel"
        if self.tunnel_preference is TunnelPreference.AUTO and self._fallback_reason:
            return self._fallback_reason
        return "direct WireGuard over UDP"

    def _fall_back_to_tunnel(self, now: float) -> list[Action]:
        after = self.timing.udp_fallback_after
        self._fallback = True
        self._fallback_reason = (
            f"no WireGuard handshake over UDP within {after:.0f} s; using the gRPC tunnel"
        )
        self._set(now, connected=False, last_error=self._fallback_reason)
        return [
            Log("warning", f"{self._fallback_reason}, provisioning again"),
            Cancel(SAMPLE_TIMER),
            Schedule(UDP_RETRY_TIMER, self._udp_retry_delay),
            *self._provision(now),
        ]

    def _retry_udp(self, now: float) -> list[Action]:
        self._fallback = self._declined = False
        self._fallback_reason = (
            f"trying UDP again after {self._udp_retry_delay:.0f} s over the tunnel"
        )
        # If UDP still fails, the next stay in the tunnel is longer.
        self._udp_retry_delay = min(self._udp_retry_delay * 2, self.timing.udp_retry_max)
        return [Log("info", self._fallback_reason), Cancel(SAMPLE_TIMER), *self._provision(now)]

    def _on_provision_failed(self, error: str, now: float) -> list[Action]:
        delay = min(
            self.timing.backoff_initial * self.timing.backoff_factor**self._failures,
            self.timing.backoff_max,
        )
        self._failures += 1
        self._set(now, state=State.BACKOFF, last_error=error, next_retry_in=delay)
        return [
            Log("warning", f"provisioning failed: {error}; retrying in {delay:.1f} s"),
            Schedule(RETRY_TIMER, delay),
        ]

    def _on_provisioned(self, reply: Provisioned, now: float) -> list[Action]:
        # The failure count is kept until the link is up: a reply that cannot be applied
        # (the device cannot be built) backs off like a refused Provision.
        self._reply = reply
        self._endpoint_index = 0
        asked = self._wants_tunnel()
        reason = self._path_reason(reply, asked)
        if asked and not reply.tunnel and self.tunnel_preference is TunnelPreference.AUTO:
            self._declined = True
        self._set(
            now,
            state=State.CONFIGURING,
            provisions=self.status.provisions + 1,
            node_address=str(reply.node_address),
            server_address=str(reply.server_address),
            server_public_key=reply.server_public_key,
            endpoints=reply.endpoints,
            tunnel=reply.tunnel,
            path="tunnel" if reply.tunnel else "udp",
            path_reason=reason,
            last_error=None,
        )
        if reply.ignored_endpoints:
            bad = ", ".join(map(repr, reply.ignored_endpoints))
            return [
                Log("warning", f"server sent invalid endpoints, ignored: {bad}"),
                *self._configure(now),
            ]
        return self._configure(now)

    def _configure(self, now: float) -> list[Action]:
        assert self._reply is not None
        spec = self._spec(self._reply)
        # In tunnel mode the datagrams go to the API host inside gRPC, not to a UDP endpoint.
        shown = (
            f"gRPC tunnel via {self._config.api.target()}"
            if (self._reply.tunnel and self._config)
            else spec.endpoint
        )
        self._set(now, state=State.CONFIGURING, link_name=spec.name, endpoint=shown)
        # From here a device may exist (even if configuring it fails): removal must clean it.
        self._link_present = True
        return [ConfigureLink(self._attempt, spec)]

    def _spec(self, reply: Provisioned) -> LinkSpec:
        endpoint = reply.endpoints[self._endpoint_index] if reply.endpoints else ""
        return LinkSpec(
            name=TUNNEL_LINK_NAME if reply.tunnel else LINK_NAME,
            address=reply.node_address,
            mtu=LINK_MTU,
            listen_port=self.listen_port,
            server_public_key=reply.server_public_key,
            server_address=reply.server_address,
            endpoint=endpoint,
            keepalive=PERSISTENT_KEEPALIVE,
            grpc_peer_addr_port=reply.grpc_peer_addr_port,
        )

    def _on_link_configured(self, now: float) -> list[Action]:
        assert self._reply is not None
        self._last_rx = -1
        self._last_progress = now
        self._last_probe = now
        self._set(now, state=State.CONNECTING, connected=False)
        return [
            Log(
                "info", f"link {self.status.link_name} configured, endpoint {self.status.endpoint}"
            ),
            # Traffic right away starts the handshake instead of waiting for a keepalive.
            SendProbe(self._reply.server_address),
            Schedule(SAMPLE_TIMER, self.timing.connecting_sample_every),
        ]

    def _on_sample(self, sample: Sample, now: float) -> list[Action]:
        assert self._reply is not None
        actions: list[Action] = []
        progressed = self._last_rx >= 0 and sample.rx_bytes > self._last_rx
        if self._last_rx < 0 and sample.rx_bytes > 0 and sample.last_handshake is not None:
            progressed = True
        self._last_rx = sample.rx_bytes
        self._set(now, last_handshake=sample.last_handshake, rx_bytes=sample.rx_bytes)
        if progressed and sample.last_handshake is not None:
            self._last_progress = now
            if self.status.state is not State.UP:
                self._failures = 0
                self._set(now, state=State.UP, connected=True, last_error=None)
                actions.append(Log("info", f"link up: handshake with {self.status.endpoint}"))
            return [*actions, Schedule(SAMPLE_TIMER, self.timing.sample_every)]
        fresh = self.status.state is State.CONNECTING and now - self.status.since < 5.0
        every = self.timing.connecting_sample_every if fresh else self.timing.sample_every
        actions.append(Schedule(SAMPLE_TIMER, every))
        silent = now - self._last_progress
        if (
            self.tunnel_preference is TunnelPreference.AUTO
            and self.status.state is State.CONNECTING
            and not self._reply.tunnel
            and not self._declined
            and silent >= self.timing.udp_fallback_after
        ):
            # No handshake on a fresh UDP link: try the other endpoints quickly, then the tunnel.
            if self._endpoint_index + 1 < len(self._reply.endpoints):
                return actions + self._next_endpoint(now, self._no_handshake(silent))
            return actions + self._fall_back_to_tunnel(now)
        if silent >= self.timing.dead_after:
            return actions + self._on_dead(now, silent)
        if silent >= self.timing.probe_after and now - self._last_probe >= self.timing.probe_after:
            self._last_probe = now
            actions.append(SendProbe(self._reply.server_address))
        return actions

    def _no_handshake(self, silent: float) -> str:
        return f"no WireGuard handshake over UDP via {self.status.endpoint} within {silent:.0f} s"

    def _next_endpoint(self, now: float, reason: str) -> list[Action]:
        self._set(now, connected=False, last_error=reason)
        self._endpoint_index += 1
        return [
            Log("warning", f"link down: {reason}; trying the next endpoint"),
            # A sample of the old peer's counters must not count for the new endpoint.
            Cancel(SAMPLE_TIMER),
            *self._configure(now),
        ]

    def _on_dead(self, now: float, silent: float) -> list[Action]:
        assert self._reply is not None
        was = self.status.endpoint
        reason = f"nothing received from the server for {silent:.0f} s via {was}"
        # Another UDP endpoint is worth a try; a dead tunnel is the API host's, so ask again.
        if not self._reply.tunnel and self._endpoint_index + 1 < len(self._reply.endpoints):
            return self._next_endpoint(now, reason)
        self._set(now, connected=False, last_error=reason)
        # Endpoints used up: provision again with the same key (the server may have moved).
        return [
            Log("warning", f"link down: {reason}; provisioning again"),
            Cancel(SAMPLE_TIMER),
            *self._provision(now),
        ]
