"""The lifecycle's answer to a tunnel refused for good: report it and provision again."""

from __future__ import annotations

import ipaddress

from gatekeeper.config.siderolink import SideroLinkConfig, parse_api_url
from gatekeeper.link.lifecycle import (
    SAMPLE_TIMER,
    Cancel,
    ConfigChanged,
    ConfigureLink,
    Identity,
    Link,
    LinkConfigured,
    Log,
    NetworkReady,
    Provision,
    Provisioned,
    ProvisionSucceeded,
    Sample,
    State,
    Timing,
    TunnelFailed,
)

KEY = "x" * 43 + "="
VIRTUAL = "[fdae:41e4:649b:9304:1:2:3:4]:50889"
ID = Identity("0f2d8a3e-1111-2222-3333-444455556666")


def reply(tunnel: bool) -> Provisioned:
    return Provisioned(
        server_public_key=KEY,
        node_address=ipaddress.IPv6Interface("fdae:41e4:649b:9303:1:2:3:4/64"),
        server_address=ipaddress.IPv6Address("fdae:41e4:649b:9303::1"),
        endpoints=("[fd00::1]:51820",),
        grpc_peer_addr_port=VIRTUAL if tunnel else "",
    )


def configured(tunnel: bool) -> Link:
    link = Link(listen_port=51821, timing=Timing())
    url = "grpc://[fd00::1]:8090?grpc_tunnel=true"
    link.handle(ConfigChanged(SideroLinkConfig(api=parse_api_url(url, "test")), ID), 0)
    (p,) = [a for a in link.handle(NetworkReady(), 1) if isinstance(a, Provision)]
    actions = link.handle(ProvisionSucceeded(p.attempt, reply(tunnel)), 2)
    (c,) = [a for a in actions if isinstance(a, ConfigureLink)]
    assert c.spec.grpc_peer_addr_port == (VIRTUAL if tunnel else "")
    link.handle(LinkConfigured(c.attempt), 3)
    return link


def test_refused_tunnel_reprovisions_at_once() -> None:
    link = configured(tunnel=True)
    link.handle(Sample(last_handshake=4.0, rx_bytes=92), 4)
    assert link.status.state is State.UP and link.status.link_name == "siderolinktun"
    error = "tunnel stream to h:8090 refused: PERMISSION_DENIED: peer not allowed"
    actions = link.handle(TunnelFailed(error), 5)
    assert Cancel(SAMPLE_TIMER) in actions
    (p,) = [a for a in actions if isinstance(a, Provision)]
    assert p.tunnel  # the machine still asks for the tunnel; the server decides
    assert any(isinstance(a, Log) and "tunnel down" in a.message for a in actions)
    status = link.status
    assert status.state is State.PROVISIONING
    assert not status.connected and link.status.last_error == error


def test_tunnel_failure_is_ignored_when_not_in_tunnel_mode_or_not_linked() -> None:
    direct = configured(tunnel=False)
    assert direct.handle(TunnelFailed("stale report"), 4) == []
    assert direct.status.state is State.CONNECTING
    link = configured(tunnel=True)
    link.handle(TunnelFailed("peer replaced"), 4)
    assert link.status.state is State.PROVISIONING
    # A second report of the same failure while provisioning changes nothing.
    assert link.handle(TunnelFailed("peer replaced"), 5) == []
