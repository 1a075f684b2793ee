"""The generated code matches proto/, and the SideroLink wire contract is what the spec says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor, descriptor_pb2

from gatekeeper.pb import generate
from gatekeeper.pb.events import events_pb2
from gatekeeper.pb.siderolink import provision_pb2, wireguard_pb2

FD = descriptor.FieldDescriptor


def test_generated_code_is_up_to_date() -> None:
    stale = generate.stale_files()
    assert not stale, (
        "gatekeeper/pb is stale against proto/; run `python -m gatekeeper.pb.generate`: "
        + ", ".join(stale)
    )


def test_check_command_reports_stale_file_and_exits_nonzero(tmp_path: Path) -> None:
    out = tmp_path / "pb"
    assert generate.main(["--out-dir", str(out)]) == 0
    (out / "siderolink" / "provision_pb2.py").write_text("# edited by hand\n")
    (out / "siderolink" / "leftover_pb2.py").write_text("# from a deleted proto\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gatekeeper.pb.generate", "--check", "--out-dir", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "siderolink/provision_pb2.py (out of date)" in proc.stderr
    assert "siderolink/leftover_pb2.py (no longer generated)" in proc.stderr
    # Regenerating repairs both.
    assert generate.main(["--out-dir", str(out)]) == 0
    assert generate.stale_files(out) == []
    assert not (out / "siderolink" / "leftover_pb2.py").exists()


def test_new_proto_directory_is_picked_up_without_edits(tmp_path: Path) -> None:
    protos = tmp_path / "proto"
    for src in generate.find_protos(generate.DEFAULT_PROTO_DIR):
        (protos / src).parent.mkdir(parents=True, exist_ok=True)
        (protos / src).write_bytes((generate.DEFAULT_PROTO_DIR / src).read_bytes())
    (protos / "gktest_common").mkdir()
    (protos / "gktest_common" / "common.proto").write_text(
        'syntax = "proto3";\npackage gktest.common;\nimport "google/rpc/status.proto";\n'
        "message Metadata { string hostname = 1; google.rpc.Status status = 3; }\n"
    )
    (protos / "gktest_machine").mkdir()
    (protos / "gktest_machine" / "machine.proto").write_text(
        'syntax = "proto3";\npackage gktest.machine;\nimport "gktest_common/common.proto";\n'
        "message Version { gktest.common.Metadata metadata = 1; }\n"
    )
    out = tmp_path / "pb"
    written = {p.as_posix() for p in generate.generate_into(_mkdir(out), protos)}
    assert {
        "gktest_common/__init__.py",
        "gktest_machine/__init__.py",
        "gktest_machine/machine_pb2.pyi",
    } <= written
    machine_py = (out / "gktest_machine" / "machine_pb2.py").read_text()
    assert "from gatekeeper.pb.gktest_common import common_pb2" in machine_py
    common_py = (out / "gktest_common" / "common_pb2.py").read_text()
    # google.rpc comes from googleapis-common-protos, never from our tree.
    assert "from google.rpc import status_pb2" in common_py
    assert not (out / "google").exists()


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a, b = _mkdir(tmp_path / "a"), _mkdir(tmp_path / "b")
    files = generate.generate_into(a)
    assert files == generate.generate_into(b)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _fields(msg: Any) -> dict[int, tuple[str, int, bool, bool]]:
    """number -> (name, type, repeated, proto3 optional), read from the descriptor itself."""
    as_proto = descriptor_pb2.DescriptorProto()
    msg.CopyToProto(as_proto)
    return {
        f.number: (
            f.name,
            f.type,
            f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
            f.proto3_optional,
        )
        for f in as_proto.field
    }


def test_provision_request_fields() -> None:
    d = provision_pb2.ProvisionRequest.DESCRIPTOR
    assert d.full_name == "sidero.link.ProvisionRequest"
    assert d.file.package == "sidero.link"
    assert _fields(d) == {
        1: ("node_uuid", FD.TYPE_STRING, False, False),
        2: ("node_public_key", FD.TYPE_STRING, False, False),
        3: ("join_token", FD.TYPE_STRING, False, True),
        4: ("node_unique_token", FD.TYPE_STRING, False, True),
        5: ("talos_version", FD.TYPE_STRING, False, True),
        6: ("wireguard_over_grpc", FD.TYPE_BOOL, False, True),
    }


def test_provision_response_fields() -> None:
    d = provision_pb2.ProvisionResponse.DESCRIPTOR
    assert d.full_name == "sidero.link.ProvisionResponse"
    assert _fields(d) == {
        1: ("server_endpoint", FD.TYPE_STRING, True, False),
        3: ("server_public_key", FD.TYPE_STRING, False, False),
        4: ("node_address_prefix", FD.TYPE_STRING, False, False),
        5: ("server_address", FD.TYPE_STRING, False, False),
        6: ("grpc_peer_addr_port", FD.TYPE_STRING, False, False),
    }


def test_optional_fields_are_absent_unless_set() -> None:
    req = provision_pb2.ProvisionRequest(node_uuid="u", node_public_key="k")
    assert not req.HasField("join_token")
    req.node_unique_token = ""
    # Talos always sends the unique token, even empty: presence must survive the wire.
    again = provision_pb2.ProvisionRequest.FromString(req.SerializeToString())
    assert again.HasField("node_unique_token")
    assert not again.HasField("join_token")


def test_peer_packet_fields() -> None:
    d = wireguard_pb2.PeerPacket.DESCRIPTOR
    assert d.full_name == "sidero.link.PeerPacket"
    assert _fields(d) == {
        2: ("Data", FD.TYPE_BYTES, False, False),
        3: ("batch", FD.TYPE_BYTES, True, False),
    }


def test_event_request_fields() -> None:
    d = events_pb2.EventRequest.DESCRIPTOR
    assert d.full_name == "events.EventRequest"
    assert {f.number: f.name for f in d.fields} == {1: "data", 2: "id", 3: "actor_id"}
    data_type = d.fields_by_name["data"].message_type
    assert data_type is not None and data_type.full_name == "google.protobuf.Any"
    assert events_pb2.EventResponse.DESCRIPTOR.fields == []


@pytest.mark.parametrize(
    ("module", "service", "method", "full", "client_stream", "server_stream"),
    [
        (
            provision_pb2,
            "ProvisionService",
            "Provision",
            "/sidero.link.ProvisionService/Provision",
            False,
            False,
        ),
        (
            wireguard_pb2,
            "WireGuardOverGRPCService",
            "CreateStream",
            "/sidero.link.WireGuardOverGRPCService/CreateStream",
            True,
            True,
        ),
        (
            events_pb2,
            "EventSinkService",
            "Publish",
            "/events.EventSinkService/Publish",
            False,
            False,
        ),
    ],
)
def test_service_method_paths(
    module: object,
    service: str,
    method: str,
    full: str,
    client_stream: bool,
    server_stream: bool,
) -> None:
    file_desc: descriptor.FileDescriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
    m = file_desc.services_by_name[service].methods_by_name[method]
    assert f"/{m.containing_service.full_name}/{m.name}" == full
    assert m.client_streaming is client_stream
    assert m.server_streaming is server_stream


def test_generated_grpc_stubs_use_the_same_paths() -> None:
    from gatekeeper.pb.siderolink import provision_pb2_grpc, wireguard_pb2_grpc

    text = Path(provision_pb2_grpc.__file__).read_text()
    assert "'/sidero.link.ProvisionService/Provision'" in text
    text = Path(wireguard_pb2_grpc.__file__).read_text()
    assert "'/sidero.link.WireGuardOverGRPCService/CreateStream'" in text
