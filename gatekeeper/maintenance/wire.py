"""Resources as COSI puts them on the wire: metadata, yaml_spec and proto_spec.

yaml_spec is what talosctl prints; Talos renders it with Go's yaml.v3 (keys in the spec's
field order, four-space indentation, sequences indented under their key), so we do the same.
proto_spec is the protobuf encoding with the upstream field numbers: for ResourceDefinitions
it is cosi.resource.meta.ResourceDefinitionSpec (a generic client decodes it to resolve type
aliases); for other types it covers the fields listed in the definition's proto_fields.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from gatekeeper.maintenance.resources import (
    RESOURCE_DEFINITION_TYPE,
    FieldKind,
    Resource,
    ResourceDefinition,
    SpecField,
    thaw,
)
from gatekeeper.pb.cosi import meta_pb2, resource_pb2


@functools.cache
def _go_style_dumper() -> Any:
    """PyYAML emitter tuned to look like yaml.v3's output.

    Made on the first resource served: PyYAML is not imported with the agent (about 0.35 s of
    its start-up under emulation), and a Version call or a machine that is never asked for a
    resource does not need it."""
    import yaml

    class GoStyleDumper(yaml.SafeDumper):
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
            # yaml.v3 indents a sequence under its mapping key; PyYAML does not by default.
            super().increase_indent(flow, False)

    return GoStyleDumper


def spec_yaml(spec: Mapping[str, Any]) -> str:
    if not spec:
        return "{}\n"
    import yaml  # not with the module: see _go_style_dumper

    return yaml.dump(
        thaw(spec),
        Dumper=_go_style_dumper(),
        indent=4,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 16,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_fields(spec: Mapping[str, Any], fields: tuple[SpecField, ...]) -> bytes:
    """proto3 encoding of the listed flat fields (zero values omitted, as proto3 does)."""
    out = bytearray()
    for f in sorted(fields, key=lambda f: f.number):
        value = spec.get(f.name)
        if value is None:
            continue
        if f.kind is FieldKind.STRING:
            if value != "":
                out += _length_delimited(f.number, str(value).encode())
        elif f.kind is FieldKind.BOOL:
            if value:
                out += _varint(f.number << 3 | 0) + b"\x01"
        elif f.kind is FieldKind.UINT:
            if int(value) < 0:
                raise ValueError(f"spec field {f.name} must be >= 0, got {value}")
            if value:
                out += _varint(f.number << 3 | 0) + _varint(int(value))
        elif f.kind is FieldKind.STRINGS:
            for item in value:
                out += _length_delimited(f.number, str(item).encode())
        elif f.kind is FieldKind.ADDR_PORT and value != "":
            out += _length_delimited(f.number, _addr_port(str(value)))
    return bytes(out)


def _addr_port(text: str) -> bytes:
    """common.NetIPPort for "[addr]:port" / "a.b.c.d:port": the address's bytes, the port."""
    host, _, port = text.rpartition(":")
    ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    return _length_delimited(1, ip.packed) + _varint(2 << 3 | 0) + _varint(int(port))


def _definition_proto_from_spec(spec: Mapping[str, Any]) -> bytes:
    msg = meta_pb2.ResourceDefinitionSpec(
        resource_type=spec.get("type", ""),
        display_type=spec.get("displayType", ""),
        default_namespace=spec.get("defaultNamespace", ""),
        aliases=list(spec.get("aliases", ())),
        all_aliases=list(spec.get("allAliases", ())),
        sensitivity=(
            meta_pb2.ResourceDefinitionSpec.SENSITIVE
            if spec.get("sensitivity") == "sensitive"
            else meta_pb2.ResourceDefinitionSpec.NON_SENSITIVE
        ),
    )
    for col in spec.get("printColumns", ()):
        msg.print_columns.add(name=col["name"], json_path=col["jsonPath"])
    return msg.SerializeToString(deterministic=True)


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    whole = int(seconds)
    ts.seconds = whole
    ts.nanos = round((seconds - whole) * 1e9) % 1_000_000_000
    return ts


def to_proto(r: Resource, rd: ResourceDefinition | None) -> resource_pb2.Resource:
    """The wire form of one resource version. `rd` is its definition (None for tombstones)."""
    md = resource_pb2.Metadata(
        namespace=r.namespace,
        type=r.type,
        id=r.id,
        version=str(r.version),
        owner=r.owner,
        phase=r.phase,
    )
    if r.version:
        md.created.CopyFrom(_timestamp(r.created))
        md.updated.CopyFrom(_timestamp(r.updated))
    for k, v in r.labels.items():
        md.labels[k] = v
    spec = resource_pb2.Spec()
    if r.version:
        spec.yaml_spec = spec_yaml(r.spec)
        if r.type == RESOURCE_DEFINITION_TYPE:
            spec.proto_spec = _definition_proto_from_spec(r.spec)
        elif rd is not None and rd.proto_fields:
            spec.proto_spec = encode_fields(r.spec, rd.proto_fields)
    return resource_pb2.Resource(metadata=md, spec=spec)
