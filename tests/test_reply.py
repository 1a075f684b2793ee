"""Checking a Provision reply before anything is configured from it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.link.reply import BadReply, parse_reply
from gatekeeper.wireguard.keys import PrivateKey

KEY = PrivateKey.generate().public_key().base64()
GOOD = {
    "server_public_key": KEY,
    "node_address_prefix": "fdae:41e4:649b:9303:1:2:3:4/64",
    "server_address": "fdae:41e4:649b:9303::1",
}


def test_endpoints_are_swapped_back_into_preference_order() -> None:
    reply = parse_reply(server_endpoint=["c:3", "b:2", "a:1"], **GOOD)
    assert reply.endpoints == ("a:1", "b:2", "c:3") and not reply.tunnel


def test_invalid_endpoints_are_ignored_and_reported_not_fatal() -> None:
    reply = parse_reply(server_endpoint=["[fd00::1]:51820", "h:0", "good:1", "fd00::1:5"], **GOOD)
    # On the wire [fd00::1]:51820 and fd00::1:5 were swapped; the bare IPv6 one is unusable.
    assert reply.endpoints == ("good:1", "[fd00::1]:51820")
    assert reply.ignored_endpoints == ("fd00::1:5", "h:0")


def test_no_usable_endpoint_is_a_bad_reply() -> None:
    with pytest.raises(BadReply, match=r"no usable WireGuard endpoint .*h:99999"):
        parse_reply(server_endpoint=["h:99999"], **GOOD)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("server_public_key", "short", "invalid public key"),
        ("node_address_prefix", "10.0.0.1/24", "invalid node_address_prefix"),
        ("server_address", "nope", "invalid server_address"),
    ],
)
def test_bad_fields_are_named(field: str, value: str, message: str) -> None:
    with pytest.raises(BadReply, match=message):
        parse_reply(server_endpoint=["a:1"], **{**GOOD, field: value})


@given(st.lists(st.text(max_size=30), max_size=5))
def test_any_endpoint_list_gives_a_reply_or_one_clear_error(endpoints: list[str]) -> None:
    try:
        reply = parse_reply(server_endpoint=endpoints, **GOOD)
    except BadReply as exc:
        assert "\n" not in str(exc)
    else:
        assert reply.endpoints
