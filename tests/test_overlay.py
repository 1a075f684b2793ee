"""Spec section 5 and the endpoint quirk of section 1."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.overlay import (
    TUNNEL_SUFFIX,
    is_siderolink_address,
    overlay_prefix,
    server_address,
    swap_endpoints,
)


def test_empty_installation_id_gives_the_reference_prefixes() -> None:
    assert str(overlay_prefix("")) == "fdae:41e4:649b:9303::/64"
    assert str(overlay_prefix("", TUNNEL_SUFFIX)) == "fdae:41e4:649b:9304::/64"
    assert str(server_address(overlay_prefix(""))) == "fdae:41e4:649b:9303::1"


@given(st.text(max_size=64))
def test_every_installation_gets_a_ula_64_marked_as_siderolink(installation: str) -> None:
    prefix = overlay_prefix(installation)
    assert prefix.prefixlen == 64 and prefix.network_address.packed[0] == 0xFD
    assert is_siderolink_address(server_address(prefix))
    assert is_siderolink_address(server_address(prefix), prefix)


def test_other_addresses_are_not_siderolink() -> None:
    assert not is_siderolink_address(ipaddress.IPv6Address("fd00::1"))
    assert not is_siderolink_address(ipaddress.IPv4Address("10.0.0.1"))


def test_endpoint_swap_matches_the_spec() -> None:
    assert swap_endpoints(["A", "B", "C"]) == ["C", "B", "A"]
    assert swap_endpoints(["A"]) == ["A"] and swap_endpoints([]) == []


@given(st.lists(st.text(max_size=4), max_size=6))
def test_endpoint_swap_is_its_own_inverse(endpoints: list[str]) -> None:
    assert swap_endpoints(swap_endpoints(endpoints)) == endpoints
