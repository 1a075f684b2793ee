"""One host:port rule (Go's net.SplitHostPort) and one gRPC peer-string parser, everywhere."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from gatekeeper import netaddr, overlay
from gatekeeper.agent.telemetry import sinks_from_cmdline
from gatekeeper.maintenance import policy
from gatekeeper.netaddr import HostPortError, grpc_peer_address, split_host_port
from gatekeeper.server.attribution import grpc_peer_address as attribution_address
from gatekeeper.server.metrics import parse_listen
from gatekeeper.server.ratelimit import source_of
from gatekeeper.wireguard import kernel, uapi
from gatekeeper.wireguard.backend import WireGuardError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org:8090", ("example.org", 8090)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("[fd00::1]:8090", ("fd00::1", 8090)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ],
)
def test_host_port_as_go_splits_it(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("fd00::1:8090", "write IPv6 addresses as [address]:port"),
        ("fd00::1", "write IPv6 addresses as [address]:port"),
        ("[fd00::1]", "missing port"),
        ("host", "missing port"),
        ("[fd00::1:8090", "missing ']'"),
        ("[fd00::1]x:1", "unexpected text after ']'"),
        ("a]:1", "unexpected bracket"),
        (":8090", "missing host"),
        ("host:0", "port must be a number 1..65535"),
        ("host:65536", "port must be a number 1..65535"),
        ("host:http", "port must be a number 1..65535"),
        ("host:+1", "port must be a number 1..65535"),
        ("host:1\nx", "it contains spaces or control characters"),
    ],
)
def test_host_port_errors_are_one_line_and_say_why(text: str, why: str) -> None:
    with pytest.raises(HostPortError) as info:
        split_host_port(text, "endpoint")
    assert str(info.value) == f"endpoint {text!r} is not host:port: {why}"


def test_long_input_is_shown_shortened() -> None:
    with pytest.raises(HostPortError) as info:
        split_host_port("x" * 100_000)
    assert len(str(info.value)) < 200


def _kernel(endpoint: str) -> object:
    try:
        return kernel._split_endpoint(endpoint)
    except WireGuardError as exc:  # the backend's own error type, with the same reason
        raise ValueError(str(exc)) from None


def _sink(endpoint: str) -> object:
    sinks, problems = sinks_from_cmdline(f"talos.events.sink={endpoint}")
    if problems:
        raise ValueError(problems[0])
    return sinks.events


PARSERS: list[Callable[[str], object]] = [
    overlay.split_endpoint,
    uapi.format_endpoint,
    _kernel,
    _sink,
    parse_listen,
]


@pytest.mark.parametrize("parse", PARSERS)
def test_every_parser_refuses_an_unbracketed_ipv6_endpoint(parse: Callable[[str], object]) -> None:
    # Before, two of these took it as host fd00::1 port 8090 and two refused it.
    with pytest.raises(ValueError, match=r"write IPv6 addresses as \[address\]:port"):
        parse("fd00::1:8090")
    assert parse("[fd00::1]:8090")  # and all take the bracketed form


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv6:[fdae:41e4:649b:9303::1]:40000", "fdae:41e4:649b:9303::1"),
        ("ipv6:%5Bfdae::5%5D:4000", "fdae::5"),
        ("ipv6:[fe80::1%25eth0]:4000", "fe80::1"),
        ("ipv4:10.0.0.1:5000", "10.0.0.1"),
        ("ipv6:[::ffff:10.0.0.1]:5000", "10.0.0.1"),
        ("ipv6:fdae::5:4000", None),  # grpc always brackets: no guessing
        ("ipv4:[10.0.0.1]:5000", "10.0.0.1"),
        ("ipv4:fdae::5", None),
        ("ipv6:10.0.0.1:5", None),
        ("unix:/run/x.sock", None),
        ("ipv6:[garbage]:1", None),
        ("", None),
    ],
)
def test_one_peer_parser_behind_every_caller(peer: str, expected: str | None) -> None:
    got = grpc_peer_address(peer)
    assert (str(got) if got else None) == expected
    assert policy.peer_address(peer) == got
    v6 = got if isinstance(got, ipaddress.IPv6Address) else None
    assert attribution_address(peer) == v6
    if v6 is not None:
        assert source_of(peer) == str(ipaddress.IPv6Network((v6, 64), strict=False))
    elif got is not None:
        assert source_of(peer) == str(got)


def test_join_host_port_is_the_inverse() -> None:
    for host, port in (("fd00::1", 1), ("example.org", 443), ("10.0.0.1", 65535)):
        assert split_host_port(netaddr.join_host_port(host, port)) == (host, port)
