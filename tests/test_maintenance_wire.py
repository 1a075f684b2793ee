"""An independent client, built from the upstream field numbers alone, checks the wire format.

The message types here are written out field by field with descriptor_pb2 into a private
DescriptorPool: nothing is imported from gatekeeper.pb, so a wrong field number or type in
our .proto files would show up as a mismatch here, exactly as a Go talosctl would see it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from gatekeeper.maintenance import catalog, client
from gatekeeper.maintenance.binding import ListenOn
from gatekeeper.maintenance.server import BuildInfo, MaintenanceService

F = descriptor_pb2.FieldDescriptorProto
STRING, BOOL, BYTES, MSG, INT64, INT32 = (
    F.TYPE_STRING,
    F.TYPE_BOOL,
    F.TYPE_BYTES,
    F.TYPE_MESSAGE,
    F.TYPE_INT64,
    F.TYPE_INT32,
)
OPTIONAL, REPEATED = F.LABEL_OPTIONAL, F.LABEL_REPEATED

# (message, [(field name, number, type, label, message type)]) as upstream defines them.
MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str]]]] = [
    ("Empty", []),
    ("NodeMetadata", [("hostname", 1, STRING, OPTIONAL, ""), ("error", 2, STRING, OPTIONAL, "")]),
    (
        "VersionInfo",
        [
            (name, number, STRING, OPTIONAL, "")
            for number, name in enumerate(("tag", "sha", "built", "go_version", "os", "arch"), 1)
        ],
    ),
    ("PlatformInfo", [("name", 1, STRING, OPTIONAL, ""), ("mode", 2, STRING, OPTIONAL, "")]),
    ("FeaturesInfo", [("rbac", 1, BOOL, OPTIONAL, "")]),
    (
        "Version",
        [
            ("metadata", 1, MSG, OPTIONAL, ".indep.NodeMetadata"),
            ("version", 2, MSG, OPTIONAL, ".indep.VersionInfo"),
            ("platform", 3, MSG, OPTIONAL, ".indep.PlatformInfo"),
            ("features", 4, MSG, OPTIONAL, ".indep.FeaturesInfo"),
        ],
    ),
    ("VersionResponse", [("messages", 1, MSG, REPEATED, ".indep.Version")]),
    ("Timestamp", [("seconds", 1, INT64, OPTIONAL, ""), ("nanos", 2, INT32, OPTIONAL, "")]),
    (
        "Metadata",
        [
            *(
                (name, number, STRING, OPTIONAL, "")
                for number, name in enumerate(
                    ("namespace", "type", "id", "version", "owner", "phase"), 1
                )
            ),
            ("created", 7, MSG, OPTIONAL, ".indep.Timestamp"),
            ("updated", 8, MSG, OPTIONAL, ".indep.Timestamp"),
        ],
    ),
    ("Spec", [("proto_spec", 1, BYTES, OPTIONAL, ""), ("yaml_spec", 2, STRING, OPTIONAL, "")]),
    (
        "Resource",
        [
            ("metadata", 1, MSG, OPTIONAL, ".indep.Metadata"),
            ("spec", 2, MSG, OPTIONAL, ".indep.Spec"),
        ],
    ),
    (
        "GetRequest",
        [
            ("namespace", 1, STRING, OPTIONAL, ""),
            ("type", 2, STRING, OPTIONAL, ""),
            ("id", 3, STRING, OPTIONAL, ""),
        ],
    ),
    ("GetResponse", [("resource", 1, MSG, OPTIONAL, ".indep.Resource")]),
    (
        "SiderolinkStatusSpec",  # Talos's siderolink.StatusSpec
        [
            ("host", 1, STRING, OPTIONAL, ""),
            ("connected", 2, BOOL, OPTIONAL, ""),
            ("link_name", 3, STRING, OPTIONAL, ""),
            ("grpc_tunnel", 4, BOOL, OPTIONAL, ""),
        ],
    ),
    (
        "SiderolinkConfigSpec",  # Talos's siderolink.ConfigSpec
        [
            ("api_endpoint", 1, STRING, OPTIONAL, ""),
            ("host", 2, STRING, OPTIONAL, ""),
            ("join_token", 3, STRING, OPTIONAL, ""),
            ("insecure", 4, BOOL, OPTIONAL, ""),
            ("tunnel", 5, BOOL, OPTIONAL, ""),
        ],
    ),
    ("NetIPPort", [("ip", 1, BYTES, OPTIONAL, ""), ("port", 2, INT32, OPTIONAL, "")]),
    (
        "SiderolinkTunnelSpec",  # Talos's siderolink.TunnelSpec (node_address: common.NetIPPort)
        [
            ("api_endpoint", 1, STRING, OPTIONAL, ""),
            ("link_name", 2, STRING, OPTIONAL, ""),
            ("mtu", 3, INT64, OPTIONAL, ""),
            ("node_address", 4, MSG, OPTIONAL, ".indep.NetIPPort"),
        ],
    ),
    (
        "ResourceDefinitionSpec",  # cosi.resource.meta, sensitivity read as its enum number
        [
            ("resource_type", 1, STRING, OPTIONAL, ""),
            ("display_type", 2, STRING, OPTIONAL, ""),
            ("default_namespace", 3, STRING, OPTIONAL, ""),
            ("aliases", 4, STRING, REPEATED, ""),
            ("all_aliases", 5, STRING, REPEATED, ""),
            ("sensitivity", 7, INT32, OPTIONAL, ""),
        ],
    ),
]


def build_classes() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(name="indep.proto", package="indep", syntax="proto3")
    for name, fields in MESSAGES:
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"indep.{name}"))
        for name, _ in MESSAGES
    }


def test_version_and_get_on_the_wire() -> None:
    classes = build_classes()

    async def scenario() -> None:
        store = catalog.new_store()
        catalog.publish_siderolink_status(
            store, host="sl.example", connected=True, link_name="siderolink", tunnel=False
        )
        build = BuildInfo(tag="v9.8.7", sha="abc1234", built="2025-01-02T03:04:05Z")
        svc = MaintenanceService(store, port=0, build=build, hostname="machine-1")
        await svc.apply(ListenOn("127.0.0.1"))
        try:
            await asyncio.to_thread(talk, svc.bound_port or 0)
        finally:
            await svc.close()

    def talk(port: int) -> None:
        der = client.fetch_certificate("127.0.0.1", port)
        creds = grpc.ssl_channel_credentials(ssl.DER_cert_to_PEM_cert(der).encode())
        options = [("grpc.ssl_target_name_override", "maintenance-service.talos.dev")]
        with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
            version = ch.unary_unary(
                "/machine.MachineService/Version",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=classes["VersionResponse"].FromString,
            )(classes["Empty"](), timeout=5)
            get = ch.unary_unary(
                "/cosi.resource.State/Get",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=classes["GetResponse"].FromString,
            )
            status = get(
                classes["GetRequest"](
                    namespace="config",
                    type="SiderolinkStatuses.siderolink.talos.dev",
                    id="siderolink-status",
                ),
                timeout=5,
            )
            rd = get(
                classes["GetRequest"](
                    namespace="meta",
                    type="ResourceDefinitions.meta.cosi.dev",
                    id="siderolinkconfigs.siderolink.talos.dev",
                ),
                timeout=5,
            )

        (v,) = version.messages
        assert v.metadata.hostname == "machine-1"
        assert (v.version.tag, v.version.sha, v.version.built) == (
            "v9.8.7",
            "abc1234",
            "2025-01-02T03:04:05Z",
        )
        assert v.version.go_version.startswith("CPython") and v.version.os == "linux"
        assert v.platform.name and v.platform.mode and v.features.rbac

        md = status.resource.metadata
        assert (md.namespace, md.type, md.id, md.version, md.phase) == (
            "config",
            "SiderolinkStatuses.siderolink.talos.dev",
            "siderolink-status",
            "1",
            "running",
        )
        assert md.created.seconds > 1_600_000_000
        assert status.resource.spec.yaml_spec.startswith("host: sl.example\nconnected: true\n")
        spec = classes["SiderolinkStatusSpec"].FromString(status.resource.spec.proto_spec)
        assert (spec.host, spec.connected, spec.link_name) == ("sl.example", True, "siderolink")

        rd_spec = classes["ResourceDefinitionSpec"].FromString(rd.resource.spec.proto_spec)
        assert rd_spec.resource_type == "SiderolinkConfigs.siderolink.talos.dev"
        assert rd_spec.display_type == "SiderolinkConfig"
        assert rd_spec.default_namespace == "config"
        assert "siderolinkconfig" in rd_spec.aliases
        assert rd_spec.sensitivity == 1  # SENSITIVE

    asyncio.run(scenario())
