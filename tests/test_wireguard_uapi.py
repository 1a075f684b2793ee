"""The UAPI codec, without any socket: exact bytes, parsing, errors, and round trips."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.wireguard import uapi
from gatekeeper.wireguard.backend import PeerConfig, PeerStats, WireGuardError
from gatekeeper.wireguard.keys import PrivateKey, PublicKey
from gatekeeper.wireguard.uapi import (
    DeviceState,
    PeerUpdate,
    SetRequest,
    UapiError,
    UapiProtocolError,
)

KEY_A = PublicKey(bytes(range(32)))
KEY_B = PublicKey(bytes([0xAB] * 32))
PRIV = PrivateKey(bytes([0x11] * 32))
NET6 = ipaddress.ip_network("fd00:1::1/128")
NET4 = ipaddress.ip_network("10.0.0.0/24")

# A get reply captured from wireguard-go v0.0.20220316.
REAL_GET = (
    b"private_key=1011111111111111111111111111111111111111111111111111111111111151\n"
    b"listen_port=35050\n"
    b"public_key=2222222222222222222222222222222222222222222222222222222222222222\n"
    b"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    b"protocol_version=1\n"
    b"endpoint=[fd00:a::2]:51820\n"
    b"last_handshake_time_sec=1700000000\n"
    b"last_handshake_time_nsec=500000000\n"
    b"tx_bytes=1184\n"
    b"rx_bytes=92\n"
    b"persistent_keepalive_interval=25\n"
    b"allowed_ip=fd00::1/128\n"
    b"allowed_ip=10.1.0.0/16\n"
    b"errno=0\n\n"
)


# --- encoding ----------------------------------------------------------------------------------


def test_set_request_bytes_use_hex_keys_and_end_with_blank_line() -> None:
    request = SetRequest(
        private_key=PRIV,
        listen_port=51820,
        replace_peers=True,
        peers=(
            PeerUpdate.from_config(
                PeerConfig(
                    KEY_A, (NET6, NET4), endpoint="[fd00:a::2]:51820", persistent_keepalive=25
                )
            ),
        ),
    )
    assert uapi.encode_set(request) == (
        b"set=1\n"
        b"private_key=" + b"11" * 32 + b"\n"
        b"listen_port=51820\n"
        b"replace_peers=true\n"
        b"public_key=" + KEY_A.hex().encode() + b"\n"
        b"endpoint=[fd00:a::2]:51820\n"
        b"persistent_keepalive_interval=25\n"
        b"replace_allowed_ips=true\n"
        b"allowed_ip=fd00:1::1/128\n"
        b"allowed_ip=10.0.0.0/24\n"
        b"\n"
    )


def test_peer_config_without_keepalive_turns_keepalive_off_and_keeps_endpoint() -> None:
    update = PeerUpdate.from_config(PeerConfig(KEY_A, (NET6,)))
    assert update.persistent_keepalive == 0
    assert update.endpoint is None
    assert b"endpoint=" not in uapi.encode_set(SetRequest(peers=(update,)))


def test_remove_and_bulk_helpers() -> None:
    assert (
        uapi.encode_remove([KEY_A, KEY_B])
        == (
            f"set=1\npublic_key={KEY_A.hex()}\nremove=true\n"
            f"public_key={KEY_B.hex()}\nremove=true\n\n"
        ).encode()
    )
    bulk = uapi.encode_peers([PeerConfig(KEY_A, (NET6,)), PeerConfig(KEY_B, (NET4,))])
    assert bulk.startswith(b"set=1\npublic_key=")
    assert b"replace_peers" not in bulk
    assert uapi.decode_set(bulk).peers[1].allowed_ips == (NET4,)


def test_empty_set_request_is_valid() -> None:
    assert uapi.encode_set(SetRequest()) == b"set=1\n\n"


@pytest.mark.parametrize(
    ("endpoint", "canonical"),
    [
        ("192.0.2.1:51820", "192.0.2.1:51820"),
        ("[FD00:A:0::2]:1", "[fd00:a::2]:1"),
        ("[::ffff:192.0.2.1]:65535", "[::ffff:c000:201]:65535"),
    ],
)
def test_endpoints_are_canonical(endpoint: str, canonical: str) -> None:
    assert uapi.format_endpoint(endpoint) == canonical


@pytest.mark.parametrize(
    ("endpoint", "complaint"),
    [
        ("example.com:51820", "not an IP address"),
        ("fd00::1:51820", "write IPv6 addresses as [address]:port"),
        ("[192.0.2.1]:5", "only for IPv6"),
        ("192.0.2.1", "missing port"),
        ("192.0.2.1:0", "port must be"),
        ("192.0.2.1:65536", "port must be"),
        ("192.0.2.1:+5", "port must be"),
        ("192.0.2.1:51820\nremove=true", "spaces or control characters"),
        ("", "missing port"),
        (":5", "missing host"),
    ],
)
def test_bad_endpoints_name_the_problem(endpoint: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="endpoint") as info:
        uapi.encode_set(SetRequest(peers=(PeerUpdate(KEY_A, endpoint=endpoint),)))
    assert complaint in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("request_", "complaint"),
    [
        (SetRequest(listen_port=65536), "listen port"),
        (SetRequest(listen_port=-1), "listen port"),
        (SetRequest(peers=(PeerUpdate(KEY_A, persistent_keepalive=70000),)), "keepalive"),
        (SetRequest(peers=(PeerUpdate(KEY_A, remove=True, endpoint="1.2.3.4:5"),)), "removal"),
        (
            SetRequest(peers=(PeerUpdate(KEY_A, allowed_ips=("10.0.0.0/8",)),)),  # type: ignore[arg-type]
            "not an ipaddress network",
        ),
    ],
)
def test_bad_set_fields_raise_value_error(request_: SetRequest, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        uapi.encode_set(request_)


# --- replies -----------------------------------------------------------------------------------


def test_real_get_reply_parses() -> None:
    state = uapi.decode_get(REAL_GET)
    assert state.listen_port == 35050
    assert state.private_key is not None and state.private_key.hex().startswith("10")
    assert state.public_key == state.private_key.public_key()
    (peer,) = state.peers
    assert peer == PeerStats(
        public_key=PublicKey(bytes([0x22] * 32)),
        endpoint="[fd00:a::2]:51820",
        last_handshake=1700000000.5,
        rx_bytes=92,
        tx_bytes=1184,
        allowed_ips=(ipaddress.ip_network("fd00::1/128"), ipaddress.ip_network("10.1.0.0/16")),
        persistent_keepalive=25,
    )


def test_get_reply_of_fresh_device() -> None:
    state = uapi.decode_get(b"listen_port=54496\nerrno=0\n\n")
    assert state == DeviceState(listen_port=54496)
    assert state.private_key is None and state.public_key is None
    assert uapi.decode_get(b"errno=0\n\n").listen_port == 0


def test_peer_without_handshake_has_none() -> None:
    reply = f"public_key={KEY_A.hex()}\nlast_handshake_time_sec=0\nerrno=0\n\n".encode()
    (peer,) = uapi.decode_get(reply).peers
    assert peer.last_handshake is None and peer.endpoint is None
    assert peer.persistent_keepalive is None and peer.rx_bytes == 0


def test_unknown_keys_are_skipped_for_newer_wireguard_go() -> None:
    reply = f"listen_port=1\nshiny=1\npublic_key={KEY_A.hex()}\nshinier=2\nerrno=0\n\n"
    state = uapi.decode_get(reply.encode())
    assert state.listen_port == 1 and state.peers[0].public_key == KEY_A


@pytest.mark.parametrize(("reply", "code"), [(b"errno=0\n\n", 0), (b"errno=-22\n\n", 22)])
def test_errno(reply: bytes, code: int) -> None:
    assert uapi.decode_errno(reply) == code


def test_set_reply_errors_carry_errno_and_strerror() -> None:
    uapi.check_set_reply(b"errno=0\n\n")
    with pytest.raises(UapiError) as info:
        uapi.check_set_reply(b"errno=-98\n\n", "set listen port 51820")
    assert info.value.errno == 98
    assert str(info.value) == (
        "wireguard-go refused set listen port 51820: Address already in use (EADDRINUSE, errno 98)"
    )
    assert isinstance(info.value, WireGuardError)
    with pytest.raises(UapiError, match="get"):
        uapi.decode_get(b"errno=-5\n\n")


@pytest.mark.parametrize(
    ("reply", "complaint"),
    [
        (b"", "empty"),
        (b"errno=0\n", "does not end with an empty line"),
        (b"errno=zero\n\n", "not an integer"),
        (b"listen_port=1\n\n", "last line is not errno"),
        (b"\xff\n\n", "not ASCII"),
        (b"hello\nerrno=0\n\n", "not key=value"),
        (b"listen_port=99999\nerrno=0\n\n", "larger than 65535"),
        (b"listen_port=\xd9\xa1\nerrno=0\n\n", "not ASCII"),
        (b"private_key=12\nerrno=0\n\n", "not 64 hex digits"),
        (b"public_key=" + b"0" * 64 + b"\nlisten_port=1\nerrno=0\n\n", "device key among peers"),
        (b"public_key=" + b"0" * 64 + b"\nallowed_ip=fd00::/999\nerrno=0\n\n", "not an IP network"),
        (b"public_key=" + b"0" * 64 + b"\nendpoint=host:1\nerrno=0\n\n", "not an IP address"),
        (b"public_key=" + b"0" * 64 + b"\nerrno=0\nerrno=0\n\n", "errno before the end"),
        (b"errno=0\nerrno=0\n\n", "errno before the end"),
        (b"errno=0\n\nlisten_port=1\n\n", "not key=value"),
    ],
)
def test_malformed_get_replies_raise_protocol_error(reply: bytes, complaint: str) -> None:
    with pytest.raises(UapiProtocolError) as info:
        uapi.decode_get(reply)
    assert complaint in str(info.value)
    assert "\n" not in str(info.value)


def test_set_reply_with_extra_lines_is_a_protocol_error() -> None:
    with pytest.raises(UapiProtocolError, match="expected only errno"):
        uapi.check_set_reply(b"listen_port=1\nerrno=0\n\n")


def test_errors_never_echo_a_private_key() -> None:
    secret = "ab" * 31 + "zz"
    with pytest.raises(UapiProtocolError) as info:
        uapi.decode_get(f"private_key={secret}\nerrno=0\n\n".encode())
    assert secret not in str(info.value) and "<secret>" in str(info.value)
    with pytest.raises(UapiProtocolError) as info:
        uapi.decode_set(f"set=1\nprivate_key={secret}\n\n".encode())
    assert secret not in str(info.value)


def test_reply_complete() -> None:
    assert not uapi.reply_complete(b"")
    assert not uapi.reply_complete(b"listen_port=1\nerrno=0\n")
    assert uapi.reply_complete(b"errno=0\n\n")


@pytest.mark.parametrize(
    ("request_", "complaint"),
    [
        (b"get=1\n\n", "does not start with set=1"),
        (b"set=1\nbogus=1\n\n", "unknown device key"),
        (b"set=1\npublic_key=" + b"0" * 64 + b"\nbogus=1\n\n", "unknown peer key"),
        (b"set=1\nreplace_peers=false\n\n", "the only value is 'true'"),
        (b"set=1\npublic_key=00\n\n", "not 64 hex digits"),
    ],
)
def test_malformed_set_requests(request_: bytes, complaint: str) -> None:
    with pytest.raises(UapiProtocolError, match=complaint):
        uapi.decode_set(request_)


# --- properties --------------------------------------------------------------------------------

public_keys = st.binary(min_size=32, max_size=32).map(PublicKey)
private_keys = st.binary(min_size=32, max_size=32).map(PrivateKey)
networks = st.one_of(
    st.builds(
        lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
)
endpoints = st.one_of(
    st.builds(
        lambda a, p: f"{ipaddress.IPv4Address(a)}:{p}",
        st.integers(0, 2**32 - 1),
        st.integers(1, 65535),
    ),
    st.builds(
        lambda a, p: f"[{ipaddress.IPv6Address(a)}]:{p}",
        st.integers(0, 2**128 - 1),
        st.integers(1, 65535),
    ),
)
peer_updates = st.one_of(
    st.builds(PeerUpdate.removal, public_keys),
    st.builds(
        PeerUpdate,
        public_key=public_keys,
        update_only=st.booleans(),
        replace_allowed_ips=st.booleans(),
        allowed_ips=st.lists(networks, max_size=4).map(tuple),
        endpoint=st.none() | endpoints,
        persistent_keepalive=st.none() | st.integers(0, 65535),
    ),
)
set_requests = st.builds(
    SetRequest,
    private_key=st.none() | private_keys,
    listen_port=st.none() | st.integers(0, 65535),
    replace_peers=st.booleans(),
    peers=st.lists(peer_updates, max_size=5).map(tuple),
)
peer_stats = st.builds(
    PeerStats,
    public_key=public_keys,
    endpoint=st.none() | endpoints,
    last_handshake=st.none()
    | st.builds(lambda s, ns: s + ns / 1e9, st.integers(1, 2**34), st.integers(0, 999_999_999)),
    rx_bytes=st.integers(0, 2**64 - 1),
    tx_bytes=st.integers(0, 2**64 - 1),
    allowed_ips=st.lists(networks, max_size=4).map(tuple),
    persistent_keepalive=st.none() | st.integers(1, 65535),
)
device_states = st.builds(
    DeviceState,
    private_key=st.none() | private_keys,
    listen_port=st.integers(0, 65535),
    fwmark=st.integers(0, 2**32 - 1),
    peers=st.lists(peer_stats, max_size=5).map(tuple),
)


@given(set_requests)
def test_set_request_round_trip(request_: SetRequest) -> None:
    encoded = uapi.encode_set(request_)
    assert encoded.endswith(b"\n\n") and encoded.count(b"\n\n") == 1
    assert uapi.decode_set(encoded) == request_


@given(device_states)
def test_get_reply_round_trip(state: DeviceState) -> None:
    decoded = uapi.decode_get(uapi.encode_get_reply(state))
    assert decoded.private_key == state.private_key
    assert (decoded.listen_port, decoded.fwmark) == (state.listen_port, state.fwmark)
    assert len(decoded.peers) == len(state.peers)
    for got, want in zip(decoded.peers, state.peers, strict=True):
        assert got.last_handshake == want.last_handshake or math.isclose(
            got.last_handshake or 0, want.last_handshake or 0, abs_tol=1e-6
        )
        handshake_free = (got.public_key, got.endpoint, got.rx_bytes, got.tx_bytes)
        assert handshake_free == (want.public_key, want.endpoint, want.rx_bytes, want.tx_bytes)
        assert (got.allowed_ips, got.persistent_keepalive) == (
            want.allowed_ips,
            want.persistent_keepalive,
        )


@given(device_states)
def test_handshakes_read_alone_are_those_of_the_full_read(state: DeviceState) -> None:
    encoded = uapi.encode_get_reply(state)
    full = [p.last_handshake for p in uapi.decode_get(encoded).peers]
    assert uapi.decode_handshakes(encoded) == [None if t is None else float(int(t)) for t in full]


@given(device_states, st.lists(st.integers(0, 2000), max_size=6))
def test_handshakes_read_in_pieces_as_they_arrive(state: DeviceState, cuts: list[int]) -> None:
    encoded = uapi.encode_get_reply(state)
    reader = uapi.HandshakeReader()
    bounds = sorted({min(c, len(encoded)) for c in cuts} | {0, len(encoded)})
    for start, end in itertools.pairwise(bounds):
        assert not reader.complete
        reader.feed(encoded[start:end])
    assert reader.complete and reader.result() == uapi.decode_handshakes(encoded)


def test_a_reply_line_without_end_is_refused_before_it_grows() -> None:
    reader = uapi.HandshakeReader()
    with pytest.raises(UapiProtocolError, match="longer than"):
        for _ in range(100):
            reader.feed(b"x" * 1000)


def test_handshakes_read_alone_check_the_reply_like_the_full_read() -> None:
    with pytest.raises(UapiError) as raised:
        uapi.decode_handshakes(b"errno=-5\n\n")
    assert raised.value.errno == 5
    for reply, complaint in [
        (b"", "empty"),
        (REAL_GET[:-1], "truncated"),
        (REAL_GET.replace(b"errno=0", b"errno=x"), "not an integer"),
        (REAL_GET.replace(b"errno=0\n", b""), "not errno=N"),
        (b"\xff\xfe\n\n", "not errno=N"),
    ]:
        with pytest.raises(UapiProtocolError, match=complaint):
            uapi.decode_handshakes(reply)


@given(networks)
def test_allowed_ips_parse_as_ipaddress_reads_them(network: ipaddress.IPv4Network) -> None:
    for text in (str(network), str(network.network_address), f"{network.broadcast_address}/"
                 f"{network.prefixlen}"):  # fmt: skip
        assert uapi._parse_network(text) == ipaddress.ip_network(text, strict=False)


@pytest.mark.parametrize(
    "text",
    ["1.2.3.4/33", "fd00::/129", "fd00::/-1", "fd00::/+8", "1.2.3.4/", "fd00::/1000", "x/8",
     "1.2.3/8", "01.2.3.4/8", "fd00::1::2/64", "/8", "", "1.2.3.4/ 8"],
)  # fmt: skip
def test_bad_allowed_ips_are_refused_as_ipaddress_refuses_them(text: str) -> None:
    with pytest.raises(ValueError):
        ipaddress.ip_network(text, strict=False)
    with pytest.raises(ValueError):
        uapi._parse_network(text)


def test_an_allowed_ip_with_a_scope_is_refused() -> None:
    # ipaddress reads fd00::%eth0/64 as a network; WireGuard's allowed IPs carry no scope.
    with pytest.raises(ValueError):
        uapi._parse_network("fd00::%eth0/64")


def _parse_everything(data: bytes) -> None:
    for parse in (uapi.decode_get, uapi.decode_set, uapi.decode_errno, uapi.check_set_reply):
        with contextlib.suppress(UapiProtocolError, UapiError):
            parse(data)
    with contextlib.suppress(UapiProtocolError, UapiError):
        times = uapi.decode_handshakes(data)
        # Where the full read accepts a reply, both say the same.
        with contextlib.suppress(UapiProtocolError, UapiError):
            full = [p.last_handshake for p in uapi.decode_get(data).peers]
            assert times == [None if t is None else float(int(t)) for t in full]


@given(st.binary(max_size=300))
def test_garbage_bytes_give_only_defined_errors(data: bytes) -> None:
    _parse_everything(data)
    _parse_everything(data + b"\n\n")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "private_key",
                    "listen_port",
                    "fwmark",
                    "public_key",
                    "endpoint",
                    "allowed_ip",
                    "rx_bytes",
                    "tx_bytes",
                    "last_handshake_time_sec",
                    "last_handshake_time_nsec",
                    "persistent_keepalive_interval",
                    "errno",
                    "remove",
                    "replace_peers",
                    "update_only",
                    "replace_allowed_ips",
                    "set",
                ]
            ),
            st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=70)
            | st.sampled_from(["0", "-22", "true", "1.2.3.4:5", "fd00::/64", "a" * 64]),
        ),
        max_size=12,
    )
)
def test_plausible_garbage_gives_only_defined_errors(lines: list[tuple[str, str]]) -> None:
    _parse_everything(("".join(f"{k}={v}\n" for k, v in lines) + "\n").encode())
    _parse_everything(("set=1\n" + "".join(f"{k}={v}\n" for k, v in lines) + "\n").encode())


def test_update_only_comes_right_after_the_peers_key() -> None:
    text = uapi.encode_peers([PeerConfig(KEY_A, (NET6,), update_only=True)]).decode()
    lines = text.splitlines()
    assert lines[lines.index(f"public_key={KEY_A.hex()}") + 1] == "update_only=true"
    assert "update_only" not in uapi.encode_peers([PeerConfig(KEY_A, (NET6,))]).decode()
