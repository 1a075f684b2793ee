"""One host:port rule (Go's net.SplitHostPort) and one gRPC peer-string parser, everywhere."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

import pytest

from gatekeeper import netaddr, overlay
from gatekeeper.agent.telemetry import sinks_from_cmdline
from gatekeeper.maintenance import policy
from gatekeeper.netaddr import HostPortError, grpc_peer_address, split_host_port
from gatekeeper.server.attribution import grpc_peer_address as attribution_address
from gatekeeper.server.identity import host_of
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


def _addresses(count: int) -> list[ipaddress.IPv6Address]:
    """Addresses of every shape a zero run can take: each 16-bit group zero half the time, else
    1, 0xffff or random (so runs of every length at every place, and the ties)."""
    rng = random.Random(5952)
    out = [ipaddress.IPv6Address(n) for n in (0, 1, 0xFFFF_0000_0001, 0x1_0001, 1 << 32)]
    for _ in range(count):
        value = 0
        for _ in range(8):
            group = 0 if rng.random() < 0.5 else rng.choice((1, 0xFFFF, rng.randrange(1, 1 << 16)))
            value = value << 16 | group
        out.append(ipaddress.IPv6Address(value))
    return out


def test_ip_text_is_what_ipaddress_writes() -> None:
    # Stored addresses are compared as text (`by_address`), so the fast form may never differ
    # from the one older versions wrote with str(); also where glibc's inet_ntop writes a
    # dotted tail (::ffff:0:1, ::1:1).
    for address in _addresses(50_000):
        assert netaddr.ip_text(address) == str(address)
        assert netaddr.parse_ipv6(str(address)) == address
        assert netaddr.parse_ip(str(address)) == address
        assert netaddr.host_network(address) == ipaddress.IPv6Network(f"{address}/128")
    for v4 in ("0.0.0.0", "10.0.0.1", "255.255.255.255"):
        assert netaddr.ip_text(ipaddress.IPv4Address(v4)) == v4
        assert netaddr.parse_ip(v4) == ipaddress.IPv4Address(v4)


@pytest.mark.parametrize(
    "text", ["", "fd00::1%eth0", "fd00::g", "1.2.3", "01.2.3.4", "fd00::1\x00", "::1/128", " ::1"]
)
def test_parse_ip_refuses_what_is_no_plain_address(text: str) -> None:
    with pytest.raises(ValueError, match="is not an IP"):
        netaddr.parse_ip(text)
    if ":" in text:
        with pytest.raises(ValueError, match="is not an IPv6 address"):
            netaddr.parse_ipv6(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ipv6:[fdae:41e4:649b:9303::1]:40000", "fdae:41e4:649b:9303::1"),
        ("ipv6:%5Bfdae::5%5D:4000", "fdae::5"),
        ("ipv4:10.0.0.1:5000", "10.0.0.1"),
        ("ipv6:[::ffff:10.0.0.1]:5000", "10.0.0.1"),
        ("[fe80::1%eth0]:51820", "fe80::1"),
        ("10.0.0.1:51820", "10.0.0.1"),
        ("10.0.0.1", "10.0.0.1"),
        ("[garbage]:1", None),
        ("unix:/run/x.sock", None),
        ("", None),
    ],
)
def test_the_host_a_session_comes_from(text: str, expected: str | None) -> None:
    # The host a live session or a Provision comes from (clone refusal compares them).
    got = host_of(text)
    assert (str(got) if got is not None else None) == expected
