"""The link lifecycle state machine, driven by events alone (no network, no clock)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.config.siderolink import SideroLinkConfig, parse_api_url
from gatekeeper.link.lifecycle import (
    RETRY_TIMER,
    SAMPLE_TIMER,
    UDP_RETRY_TIMER,
    Action,
    Cancel,
    ConfigChanged,
    ConfigRejected,
    ConfigureLink,
    DeviceLost,
    Event,
    Identity,
    Link,
    LinkConfigured,
    LinkFailed,
    Log,
    NetworkReady,
    Provision,
    Provisioned,
    ProvisionFailed,
    ProvisionSucceeded,
    RemoveLink,
    Sample,
    Schedule,
    SendProbe,
    State,
    TimerFired,
    Timing,
    TunnelFailed,
    TunnelPreference,
    WaitForNetwork,
)

T = TypeVar("T")

TIMING = Timing(sample_every=5, probe_after=10, dead_after=45)
KEY = "x" * 43 + "="
REPLY = Provisioned(
    server_public_key=KEY,
    node_address=ipaddress.IPv6Interface("fdae:41e4:649b:9303:1:2:3:4/64"),
    server_address=ipaddress.IPv6Address("fdae:41e4:649b:9303::1"),
    endpoints=("[fd00::1]:51820", "[fd00::2]:51820"),
)
ID = Identity("0f2d8a3e-1111-2222-3333-444455556666", unique_token="u-secret")


def config(url: str = "grpc://[fd00::1]:8090?jointoken=s3cret") -> SideroLinkConfig:
    return SideroLinkConfig(api=parse_api_url(url, "test"), unique_token=None, source="test")


def of(actions: Sequence[object], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def state(link: Link) -> State:
    """The state now (a function call, so that mypy keeps no narrowing across handle())."""
    return link.status.state


def provisioned_link() -> tuple[Link, int]:
    """A link that has been configured and is CONNECTING; returns (link, attempt)."""
    link = Link(listen_port=51821, timing=TIMING)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    assert isinstance(p, Provision)
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, REPLY), 2), ConfigureLink)
    assert isinstance(c, ConfigureLink)
    link.handle(LinkConfigured(c.attempt), 2)
    return link, c.attempt


def test_unconfigured_until_a_config_arrives() -> None:
    link = Link(timing=TIMING)
    assert link.handle(ConfigChanged(None, ID), 0) == [
        Cancel(RETRY_TIMER),
        Cancel(UDP_RETRY_TIMER),
        Log("info", "SideroLink is not configured"),
    ]
    assert link.status.state is State.UNCONFIGURED


def test_waits_for_network_then_provisions_with_the_tunnel_hint() -> None:
    link = Link(timing=TIMING)
    actions = link.handle(ConfigChanged(config("grpc://h:1?jointoken=t&grpc_tunnel=true"), ID), 0)
    assert of(actions, WaitForNetwork)
    assert link.status.state is State.WAITING_NETWORK
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    assert isinstance(p, Provision) and p.tunnel and p.identity == ID
    assert state(link) is State.PROVISIONING


def test_configures_the_link_as_the_spec_says() -> None:
    link = Link(listen_port=51821, timing=TIMING)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, REPLY), 2), ConfigureLink)
    spec = c.spec
    assert (spec.name, spec.mtu, spec.keepalive, spec.listen_port) == (
        "siderolink",
        1280,
        25,
        51821,
    )
    assert spec.address == REPLY.node_address and spec.endpoint == REPLY.endpoints[0]
    assert link.status.node_address == "fdae:41e4:649b:9303:1:2:3:4/64"


def test_tunnel_reply_names_the_tunnel_link() -> None:
    link = Link(timing=TIMING)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    reply = Provisioned(**{**REPLY.__dict__, "grpc_peer_addr_port": "[fdae::9304:1]:50889"})
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, reply), 2), ConfigureLink)
    assert c.spec.name == "siderolinktun"
    assert link.status.tunnel


def test_backoff_grows_by_half_and_caps_at_a_minute() -> None:
    link = Link(timing=TIMING)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    delays = []
    for _ in range(15):
        actions = link.handle(ProvisionFailed(p.attempt, "UNAVAILABLE"), 2)
        (s,) = of(actions, Schedule)
        delays.append(s.delay)
        assert link.status.state is State.BACKOFF and link.status.next_retry_in == s.delay
        assert any("retrying in" in a.message for a in of(actions, Log))
        (p,) = of(link.handle(TimerFired(RETRY_TIMER), 3), Provision)
    assert delays[:3] == [0.5, 0.75, 1.125]
    assert max(delays) == 60.0 and delays[-1] == 60.0


def test_stale_outcomes_are_ignored_after_a_config_change() -> None:
    link = Link(timing=TIMING)
    link.handle(ConfigChanged(config(), ID), 0)
    (old,) = of(link.handle(NetworkReady(), 1), Provision)
    link.handle(ConfigChanged(config("grpc://other:1"), ID), 2)
    assert link.handle(ProvisionSucceeded(old.attempt, REPLY), 3) == []


def test_up_only_after_traffic_arrives() -> None:
    link, _ = provisioned_link()
    assert link.status.state is State.CONNECTING and not link.status.connected
    link.handle(Sample(last_handshake=None, rx_bytes=0), 5)
    assert not link.status.connected
    link.handle(Sample(last_handshake=1000.0, rx_bytes=92), 7)
    assert state(link) is State.UP and link.status.connected


def test_idle_healthy_link_is_probed_and_never_flaps() -> None:
    link, _ = provisioned_link()
    rx = 92
    link.handle(Sample(1000.0, rx), 5)
    probes = 0
    for t in range(10, 600, 5):
        actions = link.handle(Sample(1000.0, rx), t)
        if of(actions, SendProbe):
            probes += 1
            rx += 96  # the echo reply arrives before the next sample
        assert link.status.connected, t
    assert probes > 0


def test_dead_path_is_declared_down_within_a_minute_then_next_endpoint() -> None:
    link, _ = provisioned_link()
    link.handle(Sample(1000.0, 92), 5)
    t = 5
    while link.status.state is State.UP:
        t += 5
        actions = link.handle(Sample(1000.0, 92), t)
    assert t - 5 <= 60
    (c,) = of(actions, ConfigureLink)
    assert c.spec.endpoint == REPLY.endpoints[1]
    assert not link.status.connected and "nothing received" in (link.status.last_error or "")


def test_endpoints_used_up_reprovisions() -> None:
    link, _ = provisioned_link()
    t = 5
    for _ in range(2):
        actions: list[Action] = []
        while not of(actions, ConfigureLink) and not of(actions, Provision):
            t += 5
            actions = link.handle(Sample(None, 0), t)
        if of(actions, ConfigureLink):
            (c,) = of(actions, ConfigureLink)
            link.handle(LinkConfigured(c.attempt), t)
    assert of(actions, Provision) and Cancel(SAMPLE_TIMER) in actions
    assert link.status.state is State.PROVISIONING


def test_config_change_reprovisions_at_once_and_keeps_the_link() -> None:
    link, _ = provisioned_link()
    actions = link.handle(ConfigChanged(config("grpc://[fd00::9]:8090"), ID), 10)
    assert of(actions, Provision) and not of(actions, RemoveLink)
    actions = link.handle(ConfigChanged(config("grpc://[fd00::9]:8090"), Identity("other")), 11)
    assert of(actions, Provision)


def test_bad_new_config_keeps_the_running_link() -> None:
    link, _ = provisioned_link()
    actions = link.handle(ConfigRejected("cmdline: apiUrl path must be empty"), 10)
    assert not of(actions, RemoveLink) and not of(actions, Provision)
    first = actions[0]
    assert isinstance(first, Log) and "keeping the current link" in first.message
    assert link.status.state is State.CONNECTING


def test_removing_the_config_removes_the_link() -> None:
    link, _ = provisioned_link()
    actions = link.handle(ConfigChanged(None, ID), 10)
    assert RemoveLink() in actions and link.status.state is State.UNCONFIGURED


def test_link_failure_backs_off_and_retries() -> None:
    link = Link(timing=TIMING)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, REPLY), 2), ConfigureLink)
    actions = link.handle(LinkFailed(c.attempt, "wireguard-go not found"), 3)
    assert of(actions, Schedule) and link.status.state is State.BACKOFF
    assert "wireguard-go not found" in (link.status.last_error or "")


def test_status_never_holds_a_secret() -> None:
    link, _ = provisioned_link()
    assert "s3cret" not in repr(link.status) and "u-secret" not in repr(link.status)


events = st.one_of(
    st.builds(NetworkReady),
    st.builds(ProvisionFailed, st.integers(0, 5), st.text(max_size=5)),
    st.builds(ProvisionSucceeded, st.integers(0, 5), st.just(REPLY)),
    st.builds(LinkConfigured, st.integers(0, 5)),
    st.builds(LinkFailed, st.integers(0, 5), st.text(max_size=5)),
    st.builds(Sample, st.none() | st.floats(0, 1e6), st.integers(0, 10**6)),
    st.builds(TimerFired, st.sampled_from([RETRY_TIMER, SAMPLE_TIMER])),
    st.builds(ConfigChanged, st.sampled_from([None, config()]), st.just(ID)),
    st.builds(ConfigRejected, st.text(max_size=5)),
)


@settings(max_examples=300)
@given(st.lists(events, max_size=40))
def test_any_event_sequence_keeps_the_machine_consistent(seq: list[Event]) -> None:
    link = Link(timing=TIMING)
    for t, event in enumerate(seq):
        link.handle(event, float(t))
        s = link.status
        assert s.connected == (s.state is State.UP) or (s.state is not State.UP and not s.connected)
        if s.state is State.UNCONFIGURED:
            assert not s.connected


TUNNEL_REPLY = Provisioned(**{**REPLY.__dict__, "grpc_peer_addr_port": "[fdae::9304:1]:50889"})


def auto_link() -> tuple[Link, Provision]:
    link = Link(timing=TIMING, tunnel_preference=TunnelPreference.AUTO)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    assert isinstance(p, Provision) and not p.tunnel  # UDP first
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, REPLY), 2), ConfigureLink)
    link.handle(LinkConfigured(c.attempt), 2)
    assert link.status.path == "udp"
    return link, p


def silent_until_provision(link: Link, t: float) -> tuple[float, list[Action], list[str]]:
    """Feed samples of a link that receives nothing; acknowledge reconfigurations."""
    tried = [link.status.endpoint or ""]
    actions: list[Action] = []
    while not of(actions, Provision):
        t += 5
        actions = link.handle(Sample(None, 0), t)
        for c in of(actions, ConfigureLink):
            tried.append(c.spec.endpoint)
            link.handle(LinkConfigured(c.attempt), t)
        assert t < 10_000
    return t, actions, tried


def test_auto_asks_for_the_tunnel_when_udp_never_handshakes_and_retries_udp_later() -> None:
    link, _ = auto_link()
    t, actions, tried = silent_until_provision(link, 2.0)
    # Every UDP endpoint gets the short no-handshake wait before the tunnel is asked for.
    assert tried == list(REPLY.endpoints)
    assert t - 2 <= len(tried) * (TIMING.udp_fallback_after + TIMING.sample_every)
    (p,) = of(actions, Provision)
    assert p.tunnel
    (retry,) = [a for a in of(actions, Schedule) if a.name == UDP_RETRY_TIMER]
    assert retry.delay == TIMING.udp_retry_after
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, TUNNEL_REPLY), t), ConfigureLink)
    assert c.spec.name == "siderolinktun"
    assert link.status.path == "tunnel" and "no WireGuard handshake over UDP" in (
        link.status.path_reason or ""
    )
    link.handle(LinkConfigured(c.attempt), t)
    link.handle(Sample(1000.0, 100), t + 1)
    assert link.status.connected
    # Later: UDP again, and a longer stay in the tunnel if UDP fails once more.
    (again,) = of(link.handle(TimerFired(UDP_RETRY_TIMER), t + 600), Provision)
    assert not again.tunnel
    (c,) = of(link.handle(ProvisionSucceeded(again.attempt, REPLY), t + 601), ConfigureLink)
    assert link.status.path == "udp" and "trying UDP again" in (link.status.path_reason or "")
    link.handle(LinkConfigured(c.attempt), t + 601)
    _, actions, _ = silent_until_provision(link, t + 601)
    (retry,) = [a for a in of(actions, Schedule) if a.name == UDP_RETRY_TIMER]
    assert retry.delay == 2 * TIMING.udp_retry_after


def test_auto_stays_on_udp_when_it_works() -> None:
    link, _ = auto_link()
    link.handle(Sample(1000.0, 92), 3)
    for t in range(5, 300, 5):
        actions = link.handle(Sample(1000.0, 92 + t), t)
        assert not of(actions, Provision)
    assert link.status.path == "udp" and link.status.connected


def test_off_never_asks_and_a_declined_tunnel_is_reported() -> None:
    link = Link(timing=TIMING, tunnel_preference=TunnelPreference.ON)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    assert p.tunnel
    link.handle(ProvisionSucceeded(p.attempt, REPLY), 2)
    assert link.status.path == "udp" and link.status.path_reason == "the server declined the tunnel"
    off = Link(timing=TIMING)
    off.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(off.handle(NetworkReady(), 1), Provision)
    assert not p.tunnel


def test_a_dead_tunnel_provisions_again_instead_of_trying_udp_endpoints() -> None:
    link = Link(timing=TIMING, tunnel_preference=TunnelPreference.ON)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, TUNNEL_REPLY), 2), ConfigureLink)
    assert link.status.endpoint == "gRPC tunnel via [fd00::1]:8090"
    link.handle(LinkConfigured(c.attempt), 2)
    link.handle(Sample(1000.0, 92), 3)
    t, actions = 3, []
    while link.status.state is State.UP:
        t += 5
        actions = link.handle(Sample(1000.0, 92), t)
    assert of(actions, Provision) and not of(actions, ConfigureLink)


def test_auto_with_a_declined_tunnel_stays_on_udp_and_rotates_endpoints() -> None:
    link, _ = auto_link()
    t, actions, _ = silent_until_provision(link, 2.0)
    (p,) = of(actions, Provision)
    assert p.tunnel
    # The server (tunnel mode off) answers with UDP again: no new request every 15 s.
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, REPLY), t), ConfigureLink)
    assert link.status.path_reason == "the server declined the tunnel"
    link.handle(LinkConfigured(c.attempt), t)
    t2, actions, tried = silent_until_provision(link, t)
    assert tried == list(REPLY.endpoints)  # the ordinary dead-link rotation, after 45 s each
    assert t2 - t >= 2 * TIMING.dead_after
    (again,) = of(actions, Provision)
    assert not again.tunnel


def test_removing_the_config_after_a_failed_configure_still_removes_the_device() -> None:
    link = Link(timing=TIMING)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, REPLY), 2), ConfigureLink)
    link.handle(LinkFailed(c.attempt, "endpoint host does not resolve"), 3)
    assert RemoveLink() in link.handle(ConfigChanged(None, ID), 4)


# --- a driver that answers the lifecycle's actions, so random runs reach every state ---------

CHOICES = (
    "network",
    "provision-ok",
    "provision-tunnel",
    "provision-fail",
    "configure-ok",
    "configure-fail",
    "traffic",
    "silence",
    "device-lost",
    "tunnel-failed",
    "retry-timer",
    "udp-retry-timer",
    "config-new",
    "config-none",
    "config-bad",
)


class Driver:
    """Plays the agent: remembers the work in flight and answers it as a choice says."""

    def __init__(self, preference: TunnelPreference) -> None:
        self.link = Link(listen_port=51821, timing=TIMING, tunnel_preference=preference)
        self.now = 0.0
        self.provision: Provision | None = None
        self.configure: ConfigureLink | None = None
        self.retry_scheduled = False
        self.rx = 0
        self.seen: set[State] = {self.link.status.state}
        self.up_checks = 0
        self.link.handle(ConfigChanged(config(), ID), 0)

    def feed(self, event: Event) -> None:
        self.now += 1.0
        actions = self.link.handle(event, self.now)
        for a in actions:
            if isinstance(a, Provision):
                self.provision = a
            elif isinstance(a, ConfigureLink):
                self.configure = a
            elif isinstance(a, Schedule) and a.name == RETRY_TIMER:
                self.retry_scheduled = True
        self.check(event)

    def check(self, event: object) -> None:
        s = self.link.status
        self.seen.add(s.state)
        if s.state is State.UP:
            assert s.connected
        if s.connected and s.state is not State.UP:
            # A config change re-provisions while the link it replaces still carries traffic.
            assert s.state in (State.PROVISIONING, State.BACKOFF, State.CONFIGURING)
        if s.state in (State.UNCONFIGURED, State.WAITING_NETWORK, State.CONNECTING):
            assert not s.connected
        if s.state is State.UP:
            # Up only on proof of traffic: the event that made it so was a sample with data.
            self.up_checks += 1
            assert s.last_handshake is not None and s.rx_bytes > 0
        if s.state is State.BACKOFF:
            assert self.retry_scheduled, "backing off without a retry timer"
            assert s.next_retry_in is not None and s.next_retry_in <= TIMING.backoff_max
        if s.state is State.CONFIGURING:
            assert self.configure is not None and self.link.spec is not None
        if s.state is State.PROVISIONING:
            assert self.provision is not None
        assert "s3cret" not in repr(s) and "u-secret" not in repr(s)

    def play(self, choice: str) -> None:
        p, c = self.provision, self.configure
        match choice:
            case "network":
                self.feed(NetworkReady())
            case "provision-ok" if p is not None:
                self.feed(ProvisionSucceeded(p.attempt, REPLY))
            case "provision-tunnel" if p is not None:
                self.feed(ProvisionSucceeded(p.attempt, TUNNEL_REPLY))
            case "provision-fail" if p is not None:
                self.feed(ProvisionFailed(p.attempt, "unavailable"))
            case "configure-ok" if c is not None:
                self.feed(LinkConfigured(c.attempt))
            case "configure-fail" if c is not None:
                self.feed(LinkFailed(c.attempt, "wireguard-go exited"))
            case "traffic":
                self.rx += 148
                self.feed(Sample(self.now, self.rx))
            case "silence":
                self.now += 20
                self.feed(Sample(None if self.rx == 0 else 1.0, self.rx))
            case "device-lost":
                self.feed(DeviceLost("wireguard-go exited (status -9)"))
            case "tunnel-failed":
                self.feed(TunnelFailed("peer replaced"))
            case "retry-timer":
                self.retry_scheduled = False
                self.feed(TimerFired(RETRY_TIMER))
            case "udp-retry-timer":
                self.feed(TimerFired(UDP_RETRY_TIMER))
            case "config-new":
                self.feed(ConfigChanged(config(f"grpc://[fd00::1]:{8000 + int(self.now)}"), ID))
            case "config-none":
                self.feed(ConfigChanged(None, ID))
            case "config-bad":
                self.feed(ConfigRejected("siderolink.api is present but empty"))


@settings(max_examples=300)
@given(
    st.sampled_from(list(TunnelPreference)),
    st.lists(st.sampled_from(CHOICES), max_size=60),
)
def test_driven_sequences_keep_every_invariant(
    preference: TunnelPreference, choices: list[str]
) -> None:
    driver = Driver(preference)
    for choice in choices:
        driver.play(choice)


def test_driven_sequences_reach_every_state_and_the_up_checks_run() -> None:
    import random

    rng = random.Random(20261202)
    seen: set[State] = set()
    up_checks = 0
    # Weighted towards progress, so runs get past provisioning as a real link does.
    weights = [3, 4, 1, 2, 4, 1, 4, 2, 1, 1, 2, 1, 1, 1, 1]
    for _ in range(300):
        driver = Driver(rng.choice(list(TunnelPreference)))
        for choice in rng.choices(CHOICES, weights, k=60):
            driver.play(choice)
        seen |= driver.seen
        up_checks += driver.up_checks
    assert seen == set(State)
    assert up_checks > 100


def test_a_reply_that_cannot_be_applied_backs_off_like_a_failed_provision() -> None:
    # A server that answers every Provision while the device cannot be built must not be
    # asked again every 0.5 s forever: the delays grow until the link is really up.
    link = Link(timing=TIMING)
    link.handle(ConfigChanged(config(), ID), 0)
    (p,) = of(link.handle(NetworkReady(), 1), Provision)
    delays = []
    t = 1.0
    for _ in range(6):
        (c,) = of(link.handle(ProvisionSucceeded(p.attempt, REPLY), t), ConfigureLink)
        (s,) = of(link.handle(LinkFailed(c.attempt, "wireguard-go exited"), t), Schedule)
        delays.append(s.delay)
        t += s.delay
        (p,) = of(link.handle(TimerFired(RETRY_TIMER), t), Provision)
    assert delays == [0.5, 0.75, 1.125, 1.6875, 2.53125, 3.796875]
    # Once up, the next failure starts from the first delay again.
    (c,) = of(link.handle(ProvisionSucceeded(p.attempt, REPLY), t), ConfigureLink)
    link.handle(LinkConfigured(c.attempt), t)
    link.handle(Sample(t, 100), t + 1)
    assert link.status.state is State.UP


def test_a_lost_device_is_rebuilt_with_the_same_spec_without_a_provision() -> None:
    link, attempt = provisioned_link()
    link.handle(Sample(3.0, 100), 3)
    assert link.status.state is State.UP
    actions = link.handle(DeviceLost("wireguard-go for siderolink exited (status -9)"), 4)
    assert not link.status.connected and state(link) is State.CONFIGURING
    assert not of(actions, Provision)
    (c,) = of(actions, ConfigureLink)
    assert c.spec == link.spec and c.attempt == attempt
    assert "exited" in (link.status.last_error or "")
