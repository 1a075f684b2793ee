"""The wire-compat helpers against each other over real loopback gRPC sockets."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from wirecompat import (
    MinimalProvisionServer,
    PeerPacket,
    ProvisionRequest,
    ProvisionResponse,
    open_raw_stream,
    raw_provision,
)

KEY = "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28="  # 32 bytes, base64


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_classes_live_outside_the_default_pool() -> None:
    assert ProvisionRequest.DESCRIPTOR.full_name == "sidero.link.ProvisionRequest"
    assert ProvisionRequest.DESCRIPTOR.file.pool is not descriptor_pool.Default()
    assert ProvisionRequest.DESCRIPTOR.file.name == "wirecompat/siderolink_compat.proto"


def test_wire_bytes_follow_the_written_field_numbers() -> None:
    # field 3 (join_token), wire type 2: tag 0x1a; field 4 present even when empty.
    req = ProvisionRequest(node_uuid="u", node_public_key="k", join_token="t", node_unique_token="")
    assert req.SerializeToString() == b"\x0a\x01u\x12\x01k\x1a\x01t\x22\x00"
    resp = ProvisionResponse(server_endpoint=["a", "b"], grpc_peer_addr_port="p")
    assert resp.SerializeToString() == b"\x0a\x01a\x0a\x01b\x32\x01p"
    assert PeerPacket(Data=b"x").SerializeToString() == b"\x12\x01x"


def test_provision_round_trip_keeps_endpoint_order_and_optional_presence() -> None:
    endpoints = ["[fd00::9]:51821", "192.0.2.1:51820", "10.0.0.1:51820"]
    with MinimalProvisionServer(
        "127.0.0.1:0",
        server_endpoint=endpoints,
        server_public_key=KEY,
        node_address_prefix="fdae:41e4:649b:9303:1a2b:3c4d:5e6f:7081/64",
        server_address="fdae:41e4:649b:9303::1",
    ) as server:
        got = raw_provision(
            server.target,
            node_uuid="6e0a5c7a-0000-4000-8000-000000000001",
            node_public_key=KEY,
            node_unique_token="",
            wireguard_over_grpc=True,
        )
    assert got == {
        "server_endpoint": endpoints,
        "server_public_key": KEY,
        "node_address_prefix": "fdae:41e4:649b:9303:1a2b:3c4d:5e6f:7081/64",
        "server_address": "fdae:41e4:649b:9303::1",
        "grpc_peer_addr_port": "",
    }
    assert server.requests == [
        {
            "node_uuid": "6e0a5c7a-0000-4000-8000-000000000001",
            "node_public_key": KEY,
            "node_unique_token": "",
            "wireguard_over_grpc": True,
        }
    ]


def test_provision_error_status_reaches_the_client() -> None:
    with (
        MinimalProvisionServer(
            abort=(grpc.StatusCode.PERMISSION_DENIED, "invalid join token")
        ) as server,
        pytest.raises(grpc.RpcError) as info,
    ):
        raw_provision(server.target, node_uuid="u", node_public_key=KEY, join_token="bad")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "invalid join token"
    assert server.requests[0]["join_token"] == "bad"


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_provision_over_ipv6_loopback() -> None:
    with MinimalProvisionServer("[::1]:0", server_endpoint=["x:1"]) as server:
        assert server.target == f"[::1]:{server.port}"
        got = raw_provision(server.target, node_uuid="u", node_public_key=KEY)
    assert got["server_endpoint"] == ["x:1"]


def test_stream_echoes_with_header() -> None:
    header = "[fdae:41e4:649b:9304:1a2b:3c4d:5e6f:7081]:50889"
    with (
        MinimalProvisionServer(stream_peers=[header]) as server,
        open_raw_stream(server.target, header) as stream,
    ):
        stream.send(b"\x01" + bytes(31))
        assert stream.recv() == b"\x01" + bytes(31)
        stream.send(b"two", batch=[b"three", b"four"])
        assert stream.recv_packet() == {"Data": b"two", "batch": [b"three", b"four"]}
    assert server.stream_headers == [header]


def test_stream_with_unknown_header_is_denied() -> None:
    with (
        MinimalProvisionServer(stream_peers=["[fd00::1]:50889"]) as server,
        open_raw_stream(server.target, "[fd00::2]:50889") as stream,
    ):
        with pytest.raises(grpc.RpcError) as info:
            stream.recv()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert stream.wait_end() == (grpc.StatusCode.PERMISSION_DENIED, "peer not allowed")
        assert server.stream_headers == ["[fd00::2]:50889"]


def test_stream_without_header() -> None:
    with (
        MinimalProvisionServer(stream_peers=["[fd00::1]:50889"]) as server,
        open_raw_stream(server.target, None) as stream,
    ):
        assert stream.wait_end()[0] == grpc.StatusCode.PERMISSION_DENIED
    assert server.stream_headers == [None]


def test_generated_modules_agree_with_the_written_numbers() -> None:
    from gatekeeper.pb.siderolink import provision_pb2, wireguard_pb2

    fields: dict[str, Any] = {
        "node_uuid": "u",
        "node_public_key": KEY,
        "join_token": "t",
        "node_unique_token": "",
        "talos_version": "v1.9.0",
        "wireguard_over_grpc": False,
    }
    assert (
        provision_pb2.ProvisionRequest(**fields).SerializeToString()
        == ProvisionRequest(**fields).SerializeToString()
    )
    resp: dict[str, Any] = {
        "server_endpoint": ["c:3", "b:2", "a:1"],
        "server_public_key": KEY,
        "node_address_prefix": "fd00::2/64",
        "server_address": "fd00::1",
        "grpc_peer_addr_port": "[fd00::3]:50889",
    }
    assert (
        provision_pb2.ProvisionResponse(**resp).SerializeToString()
        == ProvisionResponse(**resp).SerializeToString()
    )
    packet: dict[str, Any] = {"Data": b"d", "batch": [b"e"]}
    assert (
        wireguard_pb2.PeerPacket(**packet).SerializeToString()
        == PeerPacket(**packet).SerializeToString()
    )
